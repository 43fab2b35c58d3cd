"""pyproject.toml: a wheel installed into a fresh folder, and an editable install of a clone, give
`import soundnet`, soundnet_io and soundnet_hear from any folder and the two commands. An
installed copy keeps its weights in $XDG_CACHE_HOME/soundnet/ and reads its class names from the
package data; a clone keeps both in models/."""
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import nbformat
import pytest

from conftest import ROOT

# bdist_wheel is part of setuptools from 70.1; older ones need the `wheel` package as well.
MIN_SETUPTOOLS = (70, 1)
# Checked from another folder, so the clone on sys.path cannot be what is imported.
CHECK = """
import site, sys
from pathlib import Path
site.addsitedir(sys.argv[1])   # the install folder, .pth files included (editable installs)
import soundnet, soundnet_hear, soundnet_io
for module in (soundnet, soundnet_hear, soundnet_io):
    print(Path(module.__file__).resolve().parent)
print(soundnet.WEIGHTS_PATH)
print(len(soundnet.load_categories("y_obj")), len(soundnet.load_categories("y_scns")))
if sys.argv[2] == "load":
    print(soundnet.SoundNet.from_pretrained().weights_sha256)
"""


def pip(*args, cwd):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
                   cwd=cwd, check=True)


def check_from_elsewhere(tmp_path, target, load, env):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-c", CHECK, str(target), load], cwd=elsewhere,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def clone(tmp_path):
    """The repository without its weights (the build must not need or ship them)."""
    assert tuple(map(int, version("setuptools").split(".")[:2])) >= MIN_SETUPTOOLS, \
        "building the wheel needs setuptools >= 70.1: pip install -r tests/requirements.txt"
    copy = tmp_path / "clone"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", "sound8.npy", "__pycache__", ".pytest_cache", "build", "*.egg-info", "out"))
    return copy


@pytest.fixture
def env(tmp_path):
    """A per-user cache that already holds the weights, so nothing is downloaded."""
    cache = tmp_path / "cache"
    (cache / "soundnet").mkdir(parents=True)
    (cache / "soundnet" / "sound8.npy").symlink_to(ROOT / "models" / "sound8.npy")
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": ""}


def test_wheel_installs_modules_commands_and_class_names_and_reads_cached_weights(
        clone, env, tmp_path):
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), ".", cwd=clone)
    wheel, = (tmp_path / "dist").glob("soundnet_pytorch-*.whl")
    assert wheel.stat().st_size < 1_000_000   # the 57 MB weights are not in it
    target = tmp_path / "target"
    pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=tmp_path)
    (target / "models").mkdir()   # another package's: not where this one's files are

    lines = check_from_elsewhere(tmp_path, target, "load", env)
    assert lines[:3] == [str(target.resolve())] * 3
    assert lines[3] == env["XDG_CACHE_HOME"] + "/soundnet/sound8.npy"
    assert lines[4:] == ["1000 401", "7bef691761d00a23b027751bb8e7bdadc603a03f3bbec5574e7cd54c98a850c5"]
    for command, usage in (("soundnet-extract", "-o OUTPUT"), ("soundnet-pool", "-i INPUT")):
        result = subprocess.run([str(target / "bin" / command), "--help"], capture_output=True,
                                text=True, env={**env, "PYTHONPATH": str(target)}, cwd=tmp_path)
        assert result.returncode == 0 and f"usage: {command} " in result.stdout, result.stderr
        assert usage in result.stdout


def test_editable_install_keeps_weights_and_class_names_in_the_clone(clone, env, tmp_path):
    target = tmp_path / "target"
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), "-e", ".",
        cwd=clone)
    lines = check_from_elsewhere(tmp_path, target, "no", env)
    assert lines[:3] == [str(clone.resolve())] * 3
    assert lines[3:] == [str(clone.resolve() / "models" / "sound8.npy"), "1000 401"]
    assert (target / "bin" / "soundnet-extract").is_file()

    # examples/soundnet.ipynb copied out of the clone finds the clone through the install.
    notebook = nbformat.read(clone / "examples" / "soundnet.ipynb", as_version=4)
    first_cell = next(cell for cell in notebook.cells if cell.cell_type == "code").source
    result = subprocess.run(
        [sys.executable, "-c", f"import site; site.addsitedir({str(target)!r})\n{first_cell}\n"
         "print(ROOT, AUDIO.is_dir())"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": ""})   # matplotlib's font cache: the user's own
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(clone.resolve()), "True"]
