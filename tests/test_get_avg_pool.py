import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import get_avg_pool

ROOT = Path(__file__).resolve().parent.parent
NUMPY_POOLS = {
    "mean": lambda x: x.mean(axis=0),
    "max": lambda x: x.max(axis=0),
    "meanmax": lambda x: np.concatenate([x.mean(axis=0), x.max(axis=0)]),
    "meanstd": lambda x: np.concatenate([x.mean(axis=0), x.std(axis=0)]),
}


def make_raw(root, feature, shapes, seed=0):
    """RAW/<feature>/<key>.npy for each key -> (T, C), described in RAW/soundnet.json as
    extract_feats.py does; returns {key: array}."""
    describe(root, feature)
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in shapes.items():
        path = root / feature / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays[key] = rng.standard_normal(shape).astype(np.float32)
        np.save(path, arrays[key])
    return arrays


def describe(root, feature, settings=None):
    """Add `feature` to RAW/soundnet.json (made with `settings`)."""
    path = root / "soundnet.json"
    meta = json.loads(path.read_text()) if path.exists() else {"channel": "mean", "features": {}}
    meta.update(settings or {})
    meta["features"][feature] = {"channels": 0}
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta))


def load(path):
    return np.load(path, allow_pickle=False)


def read_index(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", "path"]
    assert [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    return [r[1] for r in rows[1:]]


@pytest.fixture
def raw(tmp_path):
    """RAW with conv7 and y_scns of different shapes, and the files a writer leaves around."""
    root = tmp_path / "raw"
    conv7 = make_raw(root, "conv7", {"a/x": (7, 16), "b/x": (3, 16), "top": (1, 16)}, seed=1)
    y_scns = make_raw(root, "y_scns", {"a/x": (7, 401), "b/x": (3, 401), "top": (1, 401)}, seed=2)
    (root / "manifest.csv").write_text("path\n")
    (root / "conv7" / "a" / ".x.npy.123.abcd.partial").write_bytes(b"junk")
    (root / "conv7" / "a" / ".hidden.npy").write_bytes(b"junk")
    return root, conv7, y_scns


@pytest.mark.parametrize("pool", NUMPY_POOLS)
def test_every_pool_mode_matches_numpy(raw, tmp_path, pool):
    root, conv7, _ = raw
    out = tmp_path / "out"
    assert get_avg_pool.main(["-i", str(root), "-o", str(out), "--pool", pool, "--quiet"]) == 0
    for key, frames in conv7.items():
        vector = load(out / f"{key}.npy")
        assert vector.dtype == np.float32
        np.testing.assert_allclose(vector, NUMPY_POOLS[pool](frames), rtol=1e-6, atol=1e-7)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == \
        ["a/x.npy", "b/x.npy", "top.npy"]  # nested equal stems kept apart, hidden files ignored


def test_feature_flag_picks_its_folder(raw, tmp_path):
    # Regression: the earlier port ignored -f and always pooled conv7.
    root, conv7, y_scns = raw
    out = tmp_path / "out"
    assert get_avg_pool.main(["-i", str(root), "-o", str(out), "-f", "y_scns", "--quiet"]) == 0
    for key, frames in y_scns.items():
        vector = load(out / f"{key}.npy")
        assert vector.shape == (401,)
        np.testing.assert_allclose(vector, frames.mean(axis=0), rtol=1e-6, atol=1e-7)


def test_combined_rows_match_index_and_vectors(tmp_path):
    keys = ["b/x", "a/x", "a, b/ünï cödé", "z"]
    make_raw(tmp_path / "raw", "pool5", {k: (4 + i, 8) for i, k in enumerate(keys)})
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "raw"), "-o", str(out), "-f", "pool5", "--pool", "meanstd"]
    assert get_avg_pool.main(args + ["--combined", "--quiet"]) == 0
    matrix, index = load(out / "features.npy"), read_index(out / "index.csv")
    assert index == sorted(keys)
    assert matrix.dtype == np.float32 and matrix.shape == (len(keys), 16)
    for row, key in enumerate(index):
        np.testing.assert_array_equal(matrix[row], load(out / f"{key}.npy"))


def test_bad_arrays_reported_rest_pooled(tmp_path, capsys):
    root = tmp_path / "raw"
    good = make_raw(root, "conv7", {"good": (5, 4), "sub/good": (2, 4)})
    folder = root / "conv7"
    np.save(folder / "truncated.npy", np.ones((50, 4), np.float32))
    data = (folder / "truncated.npy").read_bytes()
    (folder / "truncated.npy").write_bytes(data[:len(data) // 2])
    np.save(folder / "pickled.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "flat.npy", np.ones(4, np.float32))
    np.save(folder / "empty.npy", np.zeros((0, 4), np.float32))
    np.save(folder / "nan.npy", np.array([[1, np.nan], [2, 3]], np.float32))
    out = tmp_path / "out"
    assert get_avg_pool.main(["-i", str(root), "-o", str(out), "--combined", "--quiet"]) == 1
    err = capsys.readouterr().err
    for name, reason in [("truncated", "unreadable"), ("pickled", "Object arrays"),
                         ("flat", "shape"), ("empty", "zero frames"), ("nan", "non-finite")]:
        line = next(line for line in err.splitlines() if f"{name}.npy" in line)
        assert reason in line
        assert not (out / f"{name}.npy").exists()
    assert read_index(out / "index.csv") == ["good", "sub/good"]
    for key, frames in good.items():
        np.testing.assert_allclose(load(out / f"{key}.npy"), frames.mean(axis=0), rtol=1e-6)


def test_missing_feature_lists_available(raw, tmp_path, capsys):
    root, _, _ = raw
    assert get_avg_pool.main(["-i", str(root), "-o", str(tmp_path / "o"), "-f", "pool5"]) == 2
    assert "features found in" in (err := capsys.readouterr().err) and "conv7, y_scns" in err
    assert get_avg_pool.main(["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == 2
    assert f"-i {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_skips_force_redoes_pool_change_redoes(raw, tmp_path, capsys):
    root, conv7, _ = raw
    out = tmp_path / "out"
    base = ["-i", str(root), "-o", str(out)]
    assert get_avg_pool.main(base) == 0
    paths = [out / f"{key}.npy" for key in conv7]
    # Set the outputs' mtime a second past their inputs': a rewrite, even within the same clock
    # tick as the first run, then shows as a changed mtime.
    old = max(os.stat(root / "conv7" / f"{k}.npy").st_mtime_ns for k in conv7)
    for path in paths:
        os.utime(path, ns=(old + 10**9, old + 10**9))
    capsys.readouterr()
    assert get_avg_pool.main(base) == 0
    assert "pooled 0 files (3 skipped, 0 failed)" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == old + 10**9 for p in paths)

    # An input rewritten after its vector is pooled again.
    os.utime(root / "conv7" / "top.npy", ns=(old + 2 * 10**9, old + 2 * 10**9))
    assert get_avg_pool.main(base) == 0
    assert "pooled 1 files (2 skipped" in capsys.readouterr().err

    assert get_avg_pool.main(base + ["--force"]) == 0
    assert "pooled 3 files (0 skipped" in capsys.readouterr().err

    # Another --pool for the same OUT must not reuse the mean vectors, though they are newer.
    assert get_avg_pool.main(base + ["--pool", "max"]) == 0
    assert "pooled 3 files (0 skipped" in capsys.readouterr().err
    for key, frames in conv7.items():
        np.testing.assert_array_equal(load(out / f"{key}.npy"), frames.max(axis=0))


def test_cli_subprocess(raw, tmp_path):
    root, conv7, _ = raw
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "get_avg_pool.py", "-i", str(root), "-o", str(out),
                          "-f", "conv7", "--combined"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "pooled 3 files (0 skipped, 0 failed)" in run.stderr
    assert read_index(out / "index.csv") == sorted(conv7)
    assert load(out / "features.npy").shape == (3, 16)


# -- the earlier port's outputs -----------------------------------------------------------------

EARLIER_PORT_CHANNELS = {"conv7": 1024, "y_obj": 1000, "y_scns": 401}


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def earlier_port_folder(root, stems, seed=0):
    """<stem>.npy as the earlier port saved it, np.save of a dict of (1, C, T, 1) float32
    arrays, and <stem>.csv, its pooling script's mean vector (';'-separated, one value per
    line). Returns {stem: dict}."""
    rng = np.random.default_rng(seed)
    saved = {}
    for i, stem in enumerate(stems):
        frames = 17 + i
        saved[stem] = {key: rng.standard_normal((1, c, frames if key == "conv7" else 5, 1))
                       .astype(np.float32) for key, c in EARLIER_PORT_CHANNELS.items()}
        path = root / f"{stem}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, saved[stem])
        mean = saved[stem]["conv7"][0, :, :, 0].mean(axis=1)
        path.with_suffix(".csv").write_text("".join(f"{v};\n" for v in mean))
    return saved


def test_earlier_port_folder_pools_to_its_own_mean(tmp_path, capsys):
    old = tmp_path / "old"
    saved = earlier_port_folder(old, ["dog", "sub/cat"])
    out = tmp_path / "pooled"
    assert get_avg_pool.main(["-i", str(old), "-o", str(out), "--combined", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "the earlier port's format" in err and "Torch module 22 (conv7.conv" in err
    for stem, arrays in saved.items():
        vector = load(out / f"{stem}.npy")
        its_mean = np.array([float(v.rstrip(";")) for v in
                             (old / f"{stem}.csv").read_text().split()], np.float32)
        np.testing.assert_allclose(vector, its_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(vector, arrays["conv7"][0, :, :, 0].mean(axis=1), rtol=1e-6, atol=1e-7)
    assert read_index(out / "index.csv") == ["dog", "sub/cat"]
    settings = json.loads((out / "pooling.json").read_text())
    assert (settings["feature"], settings["torch_index"]) == ("conv7.conv", 22)
    # Its heads, by its key or by this project's Torch index; what it did not save is refused.
    assert get_avg_pool.main(["-i", str(old), "-o", str(tmp_path / "s"), "-f", "26", "--quiet"]) == 0
    np.testing.assert_allclose(load(tmp_path / "s" / "dog.npy"),
                               saved["dog"]["y_scns"][0, :, :, 0].mean(axis=1), rtol=1e-6, atol=1e-7)
    assert get_avg_pool.main(["-i", str(old), "-o", str(tmp_path / "p"), "-f", "pool5"]) == 2
    assert "the earlier port saved only conv7" in capsys.readouterr().err
    assert get_avg_pool.main(["-i", str(old), "-o", str(tmp_path / "h"), "--hop", "1"]) == 2
    assert "record no clip durations" in capsys.readouterr().err


def test_earlier_port_payload_is_refused_and_never_runs(tmp_path, capsys):
    old = tmp_path / "old"
    saved = earlier_port_folder(old, ["good"])
    marker = tmp_path / "pwned"
    evil = old / "evil.npy"
    np.save(evil, {"conv7": RunsCode(marker)}, allow_pickle=True)
    np.save(old / "plain.npy", np.ones((3, 4), np.float32))   # not the earlier port's dict
    out = tmp_path / "pooled"
    assert get_avg_pool.main(["-i", str(old), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "evil.npy" in line)
    assert line.startswith(f"{evil}: refused, not unpickled") and "posix.system" in line
    assert not marker.exists()
    assert "plain.npy: not a file of the earlier port" in err
    np.testing.assert_allclose(load(out / "good.npy"),
                               saved["good"]["conv7"][0, :, :, 0].mean(axis=1), rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in out.glob("*.npy")) == ["good.npy"]
    # The same file does run through a plain unpickler: the test would see a regression.
    np.load(evil, allow_pickle=True)
    assert marker.exists()
