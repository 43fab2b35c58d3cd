"""Issue 17 (pipeline items 3, 6, 7, 10) and issue 19 item 2: device choice and its messages,
out-of-memory retries, the batch window, the writer thread, a real full disk, model threads."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import extract_feats
import soundnet
from conftest import tone


def write_clips(folder, n, seconds, sr=22050):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(folder / f"{i:02d}.wav", tone(seconds, sr=sr, seed=i), sr)
    return folder


def extract(*args):
    return extract_feats.main([*map(str, args), "--quiet", "--workers", "0"])


def manifest(out):
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def zero_features(waves, layers, *args, **kwargs):
    """What extract_many returns, as zeros: for tests about what reaches the model."""
    layers = [soundnet.get_layer(name) for name in layers]
    return [{layer.name: np.zeros((layer.n_frames(len(w)), layer.channels), np.float32)
             for layer in layers} for w in waves]


# -- 17.6: the batch of 64 forms ------------------------------------------------------------------

def test_a_window_of_64_tiled_clips_forms(tmp_path, monkeypatch):
    folder = write_clips(tmp_path / "in", 64, 1.0)   # each tiled to 21 s: 1344 s in all
    calls = []

    def extract_many(self, waves, layers, *args, batch_size, **kwargs):
        calls.append((len(waves), batch_size))
        return zero_features(waves, layers)
    monkeypatch.setattr(soundnet.SoundNet, "extract_many", extract_many)
    assert extract("-i", folder, "-o", tmp_path / "out", "-f", ".wav", "--features", "conv7",
                   "--batch-size", 64) == 0
    assert calls == [(64, 64)]   # one window, one full batch (the window held 58 at 1200 s)
    assert len(manifest(tmp_path / "out")) == 64


# -- 19.2: a real full disk -----------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MB tmpfs, where this process may mount one (root on Linux); else skipped."""
    mount = tmp_path / "small"
    mount.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_is_reported_full(tmp_path, small_tmpfs, capsys):
    folder = write_clips(tmp_path / "in", 5, 10.0)
    out = small_tmpfs / "out"
    # conv5 of 10 s tiled to 30 s is 332 KB: the fourth file's array does not fit in 1 MB
    args = ["-i", folder, "-o", out, "-f", ".wav", "--features", "conv5"]
    assert extract(*args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{out}: the output folder is full (no space left on its device)" in lines[0]
    assert "stopped after 3 ok" in lines[0]
    assert not list(out.rglob("*.partial"))
    assert {key: row["status"] for key, row in manifest(out).items()} == {
        "00": "ok", "01": "ok", "02": "ok"}
    for path in out.rglob("*.npy"):
        assert np.load(path, allow_pickle=False).shape == (324, 256)
