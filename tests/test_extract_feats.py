"""extract_feats.py end to end, through its real command line, on generated folders."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import extract_feats
import soundnet
from conftest import ROOT, tone
from soundnet import load_audio

FEATURES = ["conv7", "y_obj", "y_scns"]
# (relative path, seconds, sample rate, channels): formats, rates, channel counts, equal stems
# in nested folders, unicode and spaces in names.
GOOD = [
    ("a/x.mp3", 12, 44100, 2),
    ("b/x.mp3", 25, 48000, 1),
    ("b/deeper/tone.wav", 8, 22050, 1),
    ("c/été 2016.flac", 21, 44100, 2),
    ("c/rain.ogg", 5, 48000, 2),
]


def write_corpus(root, files=GOOD):
    for i, (name, seconds, rate, channels) in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(seconds, sr=rate, channels=channels, seed=i), rate)
    return root


def cli(*args, timeout=300):
    """Run the real script; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "extract_feats.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def main(*args):
    """The same, in this process (faster: no interpreter start, no torch import)."""
    return extract_feats.main([*map(str, args), "--quiet"])


def manifest(out):
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def outputs(out, features=FEATURES):
    return {(f, p.relative_to(out / f).with_suffix("").as_posix()): np.load(p, allow_pickle=False)
            for f in features for p in sorted((out / f).rglob("*.npy"))}


def expected(net, path, min_seconds=20, features=FEATURES):
    """What the Python API gives for the same file."""
    return net.extract(soundnet.tile_clip(load_audio(path), min_seconds), features)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "in")


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = cli("-i", corpus, "-o", out, "-f", ".mp3", ".wav", ".flac", ".ogg", "--topk", "3")
    return out, result


def test_cli_outputs_match_the_python_api(first_run, corpus, net):
    out, result = first_run
    assert result.returncode == 0, result.stderr
    assert "5 ok, 0 failed, 0 skipped" in result.stderr
    got = outputs(out)
    assert {key for _, key in got} == {"a/x", "b/x", "b/deeper/tone", "c/été 2016", "c/rain"}
    for name, *_ in GOOD:
        key = name.rsplit(".", 1)[0]
        want = expected(net, corpus / name)
        for feature in FEATURES:
            array = got[feature, key]
            assert array.dtype == np.float32 and array.shape == want[feature].shape
            np.testing.assert_allclose(array, want[feature], rtol=0,
                                       atol=1e-5 * np.abs(want[feature]).max())


def test_manifest_metadata_and_predictions(first_run):
    out, _ = first_run
    rows = manifest(out)
    assert rows["b/x"]["status"] == "ok" and rows["b/x"]["sample_rate"] == "48000"
    assert rows["b/x"]["channels"] == "1" and float(rows["b/x"]["seconds"]) == 25.0
    assert rows["a/x"]["channels"] == "2"
    # 8 s tiled to 24 s for the network, but the manifest gives the decoded duration
    assert float(rows["b/deeper/tone"]["seconds"]) == 8.0
    tiled = 3 * 8 * 22050
    assert rows["b/deeper/tone"]["frames"] == " ".join(
        f"{f}:{soundnet.get_layer(f).n_frames(tiled)}" for f in FEATURES)
    meta = json.loads((out / "soundnet.json").read_text())
    assert meta["sample_rate"] == 22050 and meta["weights_sha256"] == soundnet.WEIGHTS_SHA256
    assert meta["min_seconds"] == 20 and meta["channel"] == "mean"
    assert meta["features"]["conv7"]["hop_samples"] == 32768
    assert meta["features"]["y_scns"]["channels"] == 401
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 5 * 2 * 3
    top = [p for p in predictions if p["path"] == "a/x" and p["head"] == "y_scns"]
    assert [p["rank"] for p in top] == ["1", "2", "3"]
    assert top[0]["label"] in soundnet.load_categories("y_scns")


def test_resume_skips_and_force_redoes(corpus, tmp_path):
    out = tmp_path / "out"
    assert main("-i", corpus, "-o", out, "-f", ".mp3", "--workers", 0) == 0
    target = out / "conv7" / "a" / "x.npy"
    stamp = target.stat().st_mtime_ns
    (out / "y_obj" / "b" / "x.npy").unlink()     # an incomplete input is redone
    assert main("-i", corpus, "-o", out, "-f", ".mp3", "--workers", 0) == 0
    assert target.stat().st_mtime_ns == stamp
    rows = manifest(out)
    assert rows["a/x"]["status"] == "ok" and rows["a/x"]["seconds"] == "12.000"
    assert rows["b/x"]["status"] == "ok" and (out / "y_obj" / "b" / "x.npy").exists()
    assert main("-i", corpus, "-o", out, "-f", ".mp3", "--workers", 0, "--force") == 0
    assert target.stat().st_mtime_ns != stamp
    assert manifest(out)["a/x"]["status"] == "ok"


def test_shards_together_equal_one_run(corpus, first_run, tmp_path):
    out = tmp_path / "out"
    exts = ["-f", ".mp3", ".wav", ".flac", ".ogg"]
    shards = [subprocess.Popen([sys.executable, str(ROOT / "extract_feats.py"), "-i", str(corpus),
                                "-o", str(out), *exts, "--shard", f"{k}/3", "--quiet"],
                               cwd=ROOT, stderr=subprocess.PIPE)
              for k in (1, 2, 3)]
    assert [p.wait(timeout=300) for p in shards] == [0, 0, 0]
    one_run = outputs(first_run[0])
    together = outputs(out)
    assert together.keys() == one_run.keys()
    for key, array in one_run.items():
        np.testing.assert_array_equal(together[key], array)
    assert set(manifest(out)) == set(manifest(first_run[0]))
    assert all(row["status"] == "ok" for row in manifest(out).values())


def test_bad_files_are_explained_and_the_rest_done(tmp_path):
    folder = write_corpus(tmp_path / "in", GOOD[:2])
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    good_mp3 = (folder / "a" / "x.mp3").read_bytes()
    (folder / "truncated.mp3").write_bytes(good_mp3[:300])
    (folder / "half.mp3").write_bytes(good_mp3[:len(good_mp3) // 2])
    (folder / "folder.mp3").mkdir()
    sf.write(folder / "blip.mp3", tone(0.05, sr=44100), 44100)
    out = tmp_path / "out"
    result = cli("-i", folder, "-o", out)
    assert result.returncode == 1, result.stderr
    rows = manifest(out)
    status = {key: row["status"] for key, row in rows.items()}
    assert status == {"a/x": "ok", "b/x": "ok", "half": "ok", "blip": "ok", "empty": "failed",
                      "noise": "failed", "truncated": "failed", "folder": "failed"}
    assert "empty file" in rows["empty"]["error"]
    assert "not an audio file" in rows["noise"]["error"]
    assert "truncated or corrupt MP3" in rows["truncated"]["error"]
    assert "is a directory" in rows["folder"]["error"]
    for key, row in rows.items():
        if row["status"] == "failed":
            assert str(folder / key) in row["error"] and row["error"] in result.stderr
    assert float(rows["half"]["seconds"]) < 7          # what decodes of a cut file
    assert float(rows["blip"]["seconds"]) == pytest.approx(0.05, abs=0.03)  # tiled to 20 s
    assert "4 ok, 4 failed, 0 skipped" in result.stderr


def test_too_short_without_tiling_fails_with_the_reason(tmp_path):
    folder = write_corpus(tmp_path / "in", [("short.wav", 5, 22050, 1), ("short2.wav", 5, 22050, 1),
                                            ("long.wav", 10, 22050, 1)])
    for batch_size in (1, 2):   # a batch of too-short files fails each of them
        out = tmp_path / f"out{batch_size}"
        assert main("-i", folder, "-o", out, "-f", ".wav", "--min-seconds", 0, "--workers", 0,
                    "--batch-size", batch_size) == 1
        rows = manifest(out)
        assert rows["long"]["status"] == "ok"
        assert rows["short"]["status"] == rows["short2"]["status"] == "failed"
        assert "y_obj: it needs at least 209374 samples (9.50 s" in rows["short"]["error"]


def test_clashing_outputs_stop_before_any_work(tmp_path, capsys):
    folder = write_corpus(tmp_path / "in", [("x.mp3", 1, 22050, 1), ("x.wav", 1, 22050, 1)])
    assert main("-i", folder, "-o", tmp_path / "out", "-f", ".mp3", ".wav") == 2
    assert "x.mp3 and" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--features", "conv9"], "unknown SoundNet layer 'conv9'"),
    (["--shard", "4/3"], "--shard takes K/N"),
])
def test_usage_errors_exit_2(corpus, tmp_path, args, message):
    result = cli("-i", corpus, "-o", tmp_path / "out", *args)
    assert result.returncode == 2 and message in result.stderr


def test_list_file_features_by_index_and_channel(corpus, tmp_path, net):
    listing = tmp_path / "files.txt"
    listing.write_text(f"# two files\n{corpus / 'a/x.mp3'}\n\n{corpus / 'c/rain.ogg'}\n")
    out = tmp_path / "out"
    assert main("--list", listing, "-i", corpus, "-o", out, "--features", "22", "pool5",
                "--channel", "first", "--workers", 0) == 0
    wave = load_audio(corpus / "c/rain.ogg", channel="first")
    want = net.extract(np.tile(wave, 5), ["conv7.conv", "pool5"])   # 5 s -> 25 s
    got = np.load(out / "conv7.conv" / "c" / "rain.npy")
    np.testing.assert_allclose(got, want["conv7.conv"], atol=1e-5 * np.abs(got).max())
    assert set(manifest(out)) == {"a/x", "c/rain"}
    meta = json.loads((out / "soundnet.json").read_text())
    assert meta["channel"] == "first" and meta["features"]["conv7.conv"]["torch_index"] == 22
    # resume finds features asked for by Torch index under their names
    assert main("--list", listing, "-i", corpus, "-o", out, "--features", "22", "pool5",
                "--channel", "first", "--workers", 0) == 0
    assert {row["status"] for row in manifest(out).values()} == {"ok"}
    # the same OUT with other settings would mix incompatible arrays: refused
    assert main("--list", listing, "-i", corpus, "-o", out, "--features", "pool5") == 2


def test_long_files_stream_and_equal_whole_file(tmp_path, net, monkeypatch):
    """Files longer than the model's chunk are decoded and run in pieces: same features."""
    monkeypatch.setattr(soundnet, "CHUNK_SECONDS", 20.0)
    folder = write_corpus(tmp_path / "in", [("long.flac", 67.3, 44100, 2)])
    out = tmp_path / "out"
    assert main("-i", folder, "-o", out, "-f", ".flac", "--features", "pool2", "conv7",
                "y_scns", "--workers", 0) == 0
    want = net.extract(load_audio(folder / "long.flac"), ["pool2", "conv7", "y_scns"],
                       chunk_seconds=1e6)
    for feature, array in want.items():
        np.testing.assert_allclose(np.load(out / feature / "long.npy"), array,
                                   atol=1e-5 * np.abs(array).max())
    assert float(manifest(out)["long"]["seconds"]) == pytest.approx(67.3, abs=1e-3)


def test_equal_length_files_batched_equal_one_by_one(tmp_path):
    folder = write_corpus(tmp_path / "in", [(f"clip{i}.wav", 10, 22050, 1) for i in range(5)])
    one, batched = tmp_path / "one", tmp_path / "batched"
    assert main("-i", folder, "-o", one, "-f", ".wav", "--workers", 0) == 0
    assert main("-i", folder, "-o", batched, "-f", ".wav", "--workers", 0,
                "--batch-size", 3) == 0
    a, b = outputs(one), outputs(batched)
    assert a.keys() == b.keys() and len(a) == 15
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5 * np.abs(a[key]).max())


# --batch-size 1: files are written a window of 4 at a time, so the signal lands mid-run
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_partial_file(tmp_path, sig):
    folder = write_corpus(tmp_path / "in", [(f"{i:02d}.wav", 20, 22050, 1) for i in range(60)])
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "extract_feats.py"), "-i", str(folder), "-o", str(out),
            "-f", ".wav", "--features", "pool1", "conv7", "--quiet", "--batch-size", "1"]
    process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "conv7").glob("*.npy")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, sig)
    _, stderr = process.communicate(timeout=60)
    done = outputs(out, ["pool1", "conv7"])
    assert 0 < len(done) < 120
    for key, array in done.items():
        assert array.shape[0] > 0   # every file present is complete (np.load would fail)
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "(interrupted)" in stderr
        assert not list(out.rglob("*.partial"))
        assert {row["status"] for row in manifest(out).values()} == {"ok"}
    # a re-run finishes exactly the rest
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert len(outputs(out, ["pool1", "conv7"])) == 120
    complete = {f"{i:02d}" for i in range(60)}
    assert {k for k, row in manifest(out).items() if row["status"] in ("ok", "skipped")} == complete



def process_state(pid):
    """The state letter of /proc/<pid>/stat ("Z": zombie), and its parent pid; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def test_decoders_exit_when_the_main_process_is_killed_before_work(tmp_path):
    # Killed while it imports torch: the workers, waiting for their files, must not linger.
    folder = write_corpus(tmp_path / "in", GOOD[:2])
    process = subprocess.Popen([sys.executable, str(ROOT / "extract_feats.py"), "-i", str(folder),
                                "-o", str(tmp_path / "out"), "--workers", "2", "--quiet"],
                               cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 30, []
    while len(workers) < 2 and time.time() < deadline:
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit()
                   and (process_state(p) or ("", 0))[1] == process.pid]
        time.sleep(0.01)
    assert len(workers) == 2
    process.kill()
    process.wait()

    def alive():
        return [p for p in workers if (process_state(p) or ("Z",))[0] != "Z"]
    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive()
