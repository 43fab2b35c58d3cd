"""Features on a time grid (get_avg_pool.py --hop/--window, soundnet.pool_windows), the exact
durations and container durations in manifest.csv, and the provenance record in soundnet.json.

The overlap rule is computed here independently of soundnet_io: in integer half-samples (every
hop, window and cell edge of the real layer geometry is a whole number of them), every frame
checked against every window."""
import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

import extract_feats
import get_avg_pool
import soundnet
import soundnet_io
from conftest import ROOT, tone
from soundnet import SAMPLE_RATE, get_layer, load_audio, pool_windows, tile_clip

POOL_MODES = ("mean", "max", "meanmax", "meanstd")


def reference(frames, layer, samples, hop_samples, window_samples, pool):
    """The issue's rule, exactly: frame n owns the cell [t_n - hop/2, t_n + hop/2); row i of
    ceil(samples / hop_samples) pools [i * hop, i * hop + window) cut at the clip's end, mean
    and std weighted by overlap, max over the frames that overlap; no overlap: the frame whose
    centre is nearest the window's centre. All positions in half-samples, as integers."""
    centre = 2 * layer.offset + (layer.receptive_field - 1) + 2 * layer.hop * np.arange(len(frames))
    cell_start, cell_end = centre - layer.hop, centre + layer.hop
    x = frames.astype(np.float64)
    rows = []
    for i in range(-(-samples // hop_samples)):
        start = 2 * i * hop_samples
        end = 2 * min(i * hop_samples + window_samples, samples)
        overlap = np.clip(np.minimum(end, cell_end) - np.maximum(start, cell_start), 0, None)
        if not overlap.any():
            overlap[np.argmin(np.abs(2 * centre - (start + end)))] = 1
        w = overlap / overlap.sum()
        mean = w @ x
        parts = {"mean": mean, "max": x[overlap > 0].max(axis=0),
                 "std": np.sqrt(w @ (x - mean) ** 2)}
        rows.append(np.concatenate([parts[r] for r in soundnet_io.POOLS[pool]]))
    return np.array(rows)


def frames_of(layer, samples, min_seconds=20.0, seed=0):
    """Random (T, C) frames with the real frame count of a clip of `samples`, tiled as
    extract_feats.py tiles it."""
    n_tiled = len(tile_clip(np.zeros(samples, np.float32), min_seconds))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((layer.n_frames(n_tiled), 6)).astype(np.float32)


# (feature, clip seconds, hop seconds, window seconds): 1-s segments of conv7, a 25 fps grid
# of pool5, overlapping 2-s windows every 0.5 s, clips shorter than one conv7 hop (1.49 s),
# durations that are exact multiples of the hop, and a head whose first frame is at 4.7 s.
CASES = [("conv7", 7.3, 1.0, None), ("conv7", 10.0, 1.0, None), ("pool5", 5.0, 0.04, None),
         ("pool5", 6.2, 0.5, 2.0), ("conv7", 6.2, 0.5, 2.0), ("conv7", 1.2, 1.0, None),
         ("conv7", 0.3, 1.0, None), ("pool5", 3.0, 1.0, None), ("conv7", 30.0, 0.96, 0.32),
         ("y_scns", 3.0, 1.0, None), ("conv1", 0.2, 0.02, None)]


@pytest.mark.parametrize("pool", POOL_MODES)
@pytest.mark.parametrize("feature, seconds, hop, window", CASES)
def test_rule_matches_independent_computation(feature, seconds, hop, window, pool):
    layer = get_layer(feature)
    samples = round(seconds * SAMPLE_RATE)
    frames = frames_of(layer, samples)
    got = pool_windows(frames, layer, samples / SAMPLE_RATE, hop, window, pool)
    hop_samples = round(hop * SAMPLE_RATE)
    window_samples = hop_samples if window is None else round(window * SAMPLE_RATE)
    want = reference(frames, layer, samples, hop_samples, window_samples, pool)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_row_counts_at_exact_multiples_and_just_past():
    layer = get_layer("pool5")
    for samples, hop, rows in [(220500, 1.0, 10), (220500, 0.04, 250), (220501, 0.04, 251),
                               (220499, 1.0, 10), (6615, 0.1, 3), (26460, 0.4, 3)]:
        frames = frames_of(layer, samples)
        assert len(pool_windows(frames, layer, samples / SAMPLE_RATE, hop)) == rows


def test_frames_past_the_clip_are_not_part_of_its_windows():
    """A 3.3 s clip tiled to 23.1 s: the frames whose cells lie past 3.3 s (its repeats) change
    nothing, however large."""
    layer, samples = get_layer("conv7"), round(3.3 * SAMPLE_RATE)
    frames = frames_of(layer, samples)
    past = layer.timestamps(len(frames)) - layer.hop_seconds / 2 >= samples / SAMPLE_RATE
    assert 0 < past.sum() < len(frames) - 2
    changed = frames.copy()
    changed[past] = 1e6
    for pool in POOL_MODES:
        np.testing.assert_array_equal(pool_windows(changed, layer, 3.3, 0.5, 2.0, pool),
                                      pool_windows(frames, layer, 3.3, 0.5, 2.0, pool))


def test_frame_grid_from_soundnet_json_equals_the_layer():
    layer = get_layer("pool5")
    entry = json.loads(json.dumps({"hop_seconds": layer.hop_seconds,
                                   "first_frame_centre_seconds": layer.first_centre_seconds}))
    frames = frames_of(layer, 150000)
    np.testing.assert_array_equal(
        pool_windows(frames, soundnet_io.FrameGrid.from_metadata(entry), 150000 / SAMPLE_RATE, 0.04),
        pool_windows(frames, layer, 150000 / SAMPLE_RATE, 0.04))


@pytest.mark.parametrize("hop, window", [(0, None), (-1, None), (1.0, 0), (1.0, -2),
                                         (float("nan"), None), (1.0, float("inf")),
                                         (1e-6, None), (1.0, 1e-6), ("1", None)])
def test_bad_grid_is_a_value_error(hop, window):
    with pytest.raises(ValueError, match="hop|window"):
        pool_windows(np.ones((5, 2), np.float32), get_layer("conv7"), 10.0, hop, window)


# -- the command line ------------------------------------------------------------------------------

CLIPS = {"short.wav": 1.2, "tiled.wav": 3.3, "ten.wav": 10.0}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """RAW of conv7 and pool5 for clips shorter than a conv7 hop, tiled, an exact 10 s."""
    root = tmp_path_factory.mktemp("grid")
    (root / "in").mkdir()
    for i, (name, seconds) in enumerate(CLIPS.items()):
        sf.write(root / "in" / name, tone(seconds, seed=i), 22050)
    raw = root / "raw"
    assert extract_feats.main(["-i", str(root / "in"), "-o", str(raw), "-f", ".wav", "--features",
                               "conv7", "pool5", "--quiet", "--workers", "0"]) == 0
    return root / "in", raw


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_manifest_records_exact_sample_counts(extracted):
    audio, raw = extracted
    rows = {row["path"]: row for row in read_rows(raw / "manifest.csv")}
    for name in CLIPS:
        row = rows[name[:-len(".wav")]]
        assert int(row["samples"]) == len(load_audio(audio / name))
        assert row["container_seconds"] == ""   # not decoded by ffmpeg


@pytest.mark.parametrize("feature, hop, window", [("conv7", 1.0, None), ("pool5", 0.04, None),
                                                  ("pool5", 0.5, 2.0)])
def test_cli_pools_each_file_by_the_rule(extracted, tmp_path, feature, hop, window):
    audio, raw = extracted
    out = tmp_path / "out"
    args = ["-i", str(raw), "-o", str(out), "-f", feature, "--hop", str(hop), "--pool", "meanstd",
            "--combined", "--quiet"] + ([] if window is None else ["--window", str(window)])
    assert get_avg_pool.main(args) == 0
    layer, hop_samples = get_layer(feature), round(hop * SAMPLE_RATE)
    window_samples = hop_samples if window is None else round(window * SAMPLE_RATE)
    matrix, index = np.load(out / "features.npy"), read_rows(out / "index.csv")
    assert list(index[0]) == ["row", "path", "window", "start_seconds"]
    start = 0
    for name in sorted(CLIPS):
        key, samples = name[:-len(".wav")], len(load_audio(audio / name))
        got = np.load(out / f"{key}.npy", allow_pickle=False)
        frames = np.load(raw / feature / f"{key}.npy")
        want = reference(frames, layer, samples, hop_samples, window_samples, "meanstd")
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert len(got) == -(-samples // hop_samples)   # a 10 s clip with --hop 1: 10 rows
        np.testing.assert_array_equal(matrix[start:start + len(got)], got)
        for i, row in enumerate(index[start:start + len(got)]):
            assert (int(row["row"]), row["path"], int(row["window"])) == (start + i, key, i)
            assert float(row["start_seconds"]) == pytest.approx(i * hop, abs=1e-9)
        start += len(got)
    assert start == len(matrix) == len(index)
    settings = json.loads((out / "pooling.json").read_text())
    assert settings["hop_seconds"] == hop and settings["window_seconds"] == (window or hop)


def test_cli_equals_the_python_api(extracted, tmp_path, net):
    audio, raw = extracted
    out = tmp_path / "out"
    assert get_avg_pool.main(["-i", str(raw), "-o", str(out), "--hop", "1", "--quiet"]) == 0
    wave = load_audio(audio / "tiled.wav")
    frames = net.extract(tile_clip(wave), "conv7")["conv7"]
    api = soundnet.pool_windows(frames, get_layer("conv7"), len(wave) / SAMPLE_RATE, hop=1.0)
    np.testing.assert_allclose(np.load(out / "tiled.npy"), api, rtol=0, atol=1e-5 * np.abs(api).max())
    assert api.shape == (4, 1024)


def test_files_without_a_duration_are_reported_the_rest_pooled(extracted, tmp_path, capsys):
    _, extracted_raw = extracted
    raw = tmp_path / "raw"
    shutil.copytree(extracted_raw, raw)
    np.save(raw / "conv7" / "stray.npy", np.ones((4, 1024), np.float32))   # no manifest row
    rows = read_rows(raw / "manifest.csv")
    for row in rows:
        if row["path"] == "ten":
            row["samples"] = ""   # a row written before the column existed
    with open(raw / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert get_avg_pool.main(["-i", str(raw), "-o", str(out), "--hop", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "stray.npy: no row in" in err and "duration is unknown" in err
    assert "ten.npy: its row in" in err and "no sample count" in err
    assert sorted(p.name for p in out.glob("*.npy")) == ["short.npy", "tiled.npy"]


def test_missing_or_unreadable_manifest_is_a_usage_error(extracted, tmp_path, capsys):
    _, extracted_raw = extracted
    raw = tmp_path / "raw"
    shutil.copytree(extracted_raw, raw)
    for text, said in [("path,samples\nten," + "9" * 200_000 + "\n", "unreadable"),
                       ("name,samples\nten,220500\n", "unreadable"),
                       ("path,seconds\nten,10.000\n", "written by an older")]:
        (raw / "manifest.csv").write_text(text)
        assert get_avg_pool.main(["-i", str(raw), "-o", str(tmp_path / "o"), "--hop", "1"]) == 2
        assert f"manifest.csv: {said}" in capsys.readouterr().err
    (raw / "manifest.csv").unlink()
    assert get_avg_pool.main(["-i", str(raw), "-o", str(tmp_path / "o"), "--hop", "1"]) == 2
    assert "manifest.csv: missing; --hop needs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, said", [
    (["--hop", "0"], "hop must be a positive"), (["--hop", "-1"], "hop must be a positive"),
    (["--hop", "1", "--window", "0"], "window must be a positive"),
    (["--hop", "1", "--window", "0.00001"], "shorter than one sample"),
    (["--window", "1"], "--window needs --hop")])
def test_bad_grid_flags_exit_2(extracted, tmp_path, capsys, flags, said):
    _, raw = extracted
    assert get_avg_pool.main(["-i", str(raw), "-o", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -- a video whose audio is shorter than its picture -------------------------------------------------

@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_manifest_records_the_container_duration_of_a_video(tmp_path):
    audio = tmp_path / "in"
    audio.mkdir()
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=5:duration=6", "-f", "lavfi", "-i",
                    "aevalsrc=0.3*sin(2*PI*330*t):s=22050:d=2.5", "-c:v", "mpeg4", "-c:a",
                    "pcm_s16le", str(audio / "owl.avi")], check=True)
    sf.write(audio / "plain.wav", tone(2.0), 22050)
    out = tmp_path / "raw"
    assert extract_feats.main(["-i", str(audio), "-o", str(out), "-f", ".avi", ".wav",
                               "--features", "conv7", "--quiet", "--workers", "0"]) == 0
    rows = {row["path"]: row for row in read_rows(out / "manifest.csv")}
    assert int(rows["owl"]["samples"]) == len(load_audio(audio / "owl.avi")) == 2.5 * 22050
    assert float(rows["owl"]["container_seconds"]) == pytest.approx(6.0, abs=0.25)
    assert rows["plain"]["container_seconds"] == ""


# -- provenance -----------------------------------------------------------------------------------------

def test_soundnet_json_records_provenance_not_compared(tmp_path):
    import torch
    audio, out = tmp_path / "in", tmp_path / "raw"
    audio.mkdir()
    sf.write(audio / "a.wav", tone(1.0), 22050)
    args = ["-i", str(audio), "-o", str(out), "-f", ".wav", "--features", "pool5", "--quiet",
            "--workers", "0"]
    assert extract_feats.main(args) == 0
    meta = json.loads((out / "soundnet.json").read_text())
    [run] = meta["provenance"]
    commit = run["soundnet_pytorch"]
    if (ROOT / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert commit.startswith(f"git {head}")
    else:
        assert commit == soundnet.__version__
    assert run["torch"] == torch.__version__ and run["numpy"] == np.__version__
    assert run["soundfile"] == sf.__version__ and run["libsndfile"] == sf.__libsndfile_version__
    import soxr
    assert run["soxr"] == soxr.__version__ and "librosa.load" in run["resampling"]
    assert run["ffmpeg"] == soundnet_io.ffmpeg_version()
    assert (run["device"], run["dtype"]) == ("cpu", "float32")
    assert run["command"] == "extract_feats.py " + " ".join(args)

    # A run whose only difference is a library version is not refused, and both are recorded.
    run["torch"] = "1.0.0"
    (out / "soundnet.json").write_text(json.dumps(meta))
    assert extract_feats.main(args + ["--force"]) == 0
    runs = json.loads((out / "soundnet.json").read_text())["provenance"]
    assert [r["torch"] for r in runs] == ["1.0.0", torch.__version__]
    # A pooling of RAW does not depend on the provenance, so it is not redone for it.
    assert get_avg_pool.main(["-i", str(out), "-o", str(tmp_path / "p"), "-f", "pool5",
                              "--quiet"]) == 0
    assert "provenance" not in (tmp_path / "p" / "pooling.json").read_text()
