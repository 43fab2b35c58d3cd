"""Issue 14: the command-line tools never leave stale, partial or silently empty results.
One test (or a few) per item of the issue, numbered as there."""
import csv
import errno
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

import extract_feats
import get_avg_pool
import soundnet
import soundnet_io
from conftest import ROOT, tone

CLIPS = {"a/one.wav": 2.0, "a/two.wav": 3.0, "b/three.wav": 2.5, "four.wav": 1.5}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "in"
    for i, (name, seconds) in enumerate(CLIPS.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, tone(seconds, seed=i), 22050)
    return root


def extract(*args):
    return extract_feats.main([*map(str, args), "--quiet", "--workers", "0"])


def pool(*args):
    return get_avg_pool.main([*map(str, args), "--quiet"])


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def manifest(out):
    return {row["path"]: row for row in read_csv(out / "manifest.csv")}


def ranks(out):
    """{(path, head): [ranks]} of predictions.csv."""
    got = {}
    for row in read_csv(out / "predictions.csv"):
        got.setdefault((row["path"], row["head"]), []).append(int(row["rank"]))
    return got


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") or ": error: " in lines[0], err
    return lines[0]


# -- 1. --force with new settings keeps no stale features -----------------------------------------

def test_other_settings_refused_naming_what_differs_then_force_removes_stale(
        corpus, tmp_path, capsys):
    out = tmp_path / "raw"
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "conv7", "pool5",
                   "y_scns", "--topk", 2) == 0
    capsys.readouterr()
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "conv7",
                   "--channel", "first") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "channel mean (now first)" in line and "conv7, pool5, y_scns" in line
    assert "min_seconds" not in line and not re.search("[0-9a-f]{64}", line)   # item 10
    assert (out / "pool5").is_dir()   # refused: nothing touched

    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "conv7",
                   "--channel", "first", "--force") == 0
    assert "removed conv7, pool5, y_scns" in capsys.readouterr().err
    meta = json.loads((out / "soundnet.json").read_text())
    assert meta["channel"] == "first" and list(meta["features"]) == ["conv7"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["conv7"]
    assert not (out / "predictions.csv").exists()
    assert {row["status"] for row in manifest(out).values()} == {"ok"}
    # what stays equals what the new settings give
    wave = soundnet_io.load_audio(corpus / "four.wav", channel="first")
    assert np.load(out / "conv7" / "four.npy").shape[0] == soundnet.get_layer("conv7").n_frames(
        len(soundnet_io.tile_clip(wave, 20)))

    # get_avg_pool: a feature folder soundnet.json does not describe is refused
    stale = out / "pool5"
    stale.mkdir()
    np.save(stale / "four.npy", np.ones((3, 256), np.float32))
    assert pool("-i", out, "-o", tmp_path / "avg", "-f", "pool5") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not described by" in line and "describes conv7" in line
    assert not (tmp_path / "avg").exists()


def test_feature_folders_without_soundnet_json_are_not_trusted(corpus, tmp_path, capsys):
    out = tmp_path / "raw"
    (out / "conv7").mkdir(parents=True)
    np.save(out / "conv7" / "four.npy", np.zeros((2, 1024), np.float32))
    (out / "notes").mkdir()   # a folder that is no feature stays
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 2
    assert "holds features (conv7) without a soundnet.json" in capsys.readouterr().err
    assert pool("-i", out, "-o", tmp_path / "avg") == 2
    assert "soundnet.json: missing" in capsys.readouterr().err
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5", "--force") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["notes", "pool5"]


def test_pooled_vectors_redone_when_raw_is_extracted_again(corpus, tmp_path, capsys):
    raw, avg = tmp_path / "raw", tmp_path / "avg"
    assert extract("-i", corpus, "-o", raw, "-f", ".wav", "--features", "pool5") == 0
    assert pool("-i", raw, "-o", avg, "-f", "pool5") == 0
    first = np.load(avg / "four.npy")
    assert extract("-i", corpus, "-o", raw, "-f", ".wav", "--features", "pool5",
                   "--min-seconds", 5, "--force") == 0
    capsys.readouterr()
    assert pool("-i", raw, "-o", avg, "-f", "pool5") == 0
    assert "pooled 4 files (0 skipped" in capsys.readouterr().err
    assert not np.array_equal(np.load(avg / "four.npy"), first)


# -- 2, 3. --topk: done only with predictions; exactly the last settings' rows --------------------

def test_topk_added_on_a_rerun_is_computed(corpus, tmp_path, capsys):
    out = tmp_path / "raw"
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 0
    assert not (out / "predictions.csv").exists()                       # item 3
    capsys.readouterr()
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5",
                   "--topk", 3) == 0
    assert "4 ok, 0 failed, 0 skipped" in capsys.readouterr().err
    keys = {k.rsplit(".", 1)[0] for k in CLIPS}
    assert ranks(out) == {(k, h): [1, 2, 3] for k in keys for h in ("y_obj", "y_scns")}

    # fewer ranks: the files are done, predictions.csv drops ranks 3..
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5",
                   "--topk", 2) == 0
    assert "0 ok, 0 failed, 4 skipped" in capsys.readouterr().err
    assert ranks(out) == {(k, h): [1, 2] for k in keys for h in ("y_obj", "y_scns")}
    # more ranks than recorded, no head arrays to rank: computed again
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5",
                   "--topk", 4) == 0
    assert "4 ok, 0 failed, 0 skipped" in capsys.readouterr().err
    assert ranks(out) == {(k, h): [1, 2, 3, 4] for k in keys for h in ("y_obj", "y_scns")}


def test_topk_ranked_from_saved_head_arrays(corpus, tmp_path, capsys):
    out = tmp_path / "raw"
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "y_obj", "y_scns") == 0
    assert not (out / "predictions.csv").exists()
    capsys.readouterr()
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "y_obj", "y_scns",
                   "--topk", 2) == 0
    assert "0 ok, 0 failed, 4 skipped" in capsys.readouterr().err
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 4 * 2 * 2
    logits = np.load(out / "y_scns" / "a" / "one.npy")
    want = soundnet.top_labels(logits, "y_scns", 2)
    got = [(r["label"], float(r["probability"])) for r in rows
           if r["path"] == "a/one" and r["head"] == "y_scns"]
    assert [label for label, _ in got] == [label for label, _ in want]


def test_failed_file_loses_its_old_predictions(corpus, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("ok.wav", "later_broken.wav"):
        sf.write(folder / name, tone(2.0), 22050)
    out = tmp_path / "raw"
    assert extract("-i", folder, "-o", out, "-f", ".wav", "--features", "pool5", "--topk", 1) == 0
    (folder / "later_broken.wav").write_bytes(b"RIFF garbage")
    assert extract("-i", folder, "-o", out, "-f", ".wav", "--features", "pool5", "--topk", 1,
                   "--force") == 1
    assert {path for path, _ in ranks(out)} == {"ok"}


# -- 4. no matching inputs is an error ------------------------------------------------------------

def test_no_matching_inputs_exit_2_saying_what_was_found(corpus, tmp_path, capsys):
    assert extract("-i", corpus, "-o", tmp_path / "out", "-f", ".mp3") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no .mp3 files under -i {corpus}; found 4 .wav" in line and "-f .wav" in line
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert extract("-i", empty, "-o", tmp_path / "out", "-f", ".mp3", ".wav") == 2
    assert "no .mp3 or .wav files under" in (err := capsys.readouterr().err)
    assert "holds no files" in err
    assert not (tmp_path / "out").exists()


# -- 5. a full disk -------------------------------------------------------------------------------

def full_after(n_ok, monkeypatch):
    """Make np.save write half an array and raise ENOSPC after n_ok successful saves."""
    real_save, calls = np.save, []

    def save(f, array, **kwargs):
        calls.append(1)
        if len(calls) <= n_ok:
            return real_save(f, array, **kwargs)
        f.write(b"\x93NUMPY" + bytes(100))   # half-written, as a full device leaves it
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", save)


def test_full_disk_stops_at_once_keeps_what_is_done_and_rerun_finishes(
        corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "raw"
    args = ["-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5", "conv7"]
    with monkeypatch.context() as m:
        full_after(3, m)   # file 1: both arrays; file 2: pool5, then conv7 hits the full disk
        assert extract(*args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "full" in line and "stopped after 1 ok" in line
    assert not list(out.rglob("*.partial"))
    rows = manifest(out)
    assert list(rows) == ["a/one"] and rows["a/one"]["status"] == "ok"
    for path in out.rglob("*.npy"):
        np.load(path, allow_pickle=False)    # complete, nothing half-written
    assert not (out / "conv7" / "a" / "two.npy").exists()

    assert extract(*args) == 0
    assert "3 ok, 0 failed, 1 skipped" in capsys.readouterr().err
    assert {row["status"] for row in manifest(out).values()} == {"ok"}   # issue 19 item 5
    assert len(manifest(out)) == 4


def test_manifest_append_on_a_full_disk_leaves_whole_rows(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "raw"
    args = ["-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5"]
    real, calls = soundnet_io.write_all, []

    def write_all(f, data):
        calls.append(1)
        if len(calls) < 3:
            return real(f, data)
        real(f, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    # compaction goes through atomic_write: fail it too, as on a really full disk
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("manifest.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(soundnet_io, "write_all", write_all)
        m.setattr(os, "replace", replace)
        assert extract(*args) == 1
    assert "full" in one_error_line(capsys.readouterr().err)
    assert (out / "manifest.csv").read_bytes().endswith(b"\n")   # whole rows
    rows = read_csv(out / "manifest.csv")
    assert [r["path"] for r in rows] == ["a/one", "a/two"]    # the third row is not there at all
    assert all(r["input"] for r in rows)
    assert not list(out.rglob("*.partial"))
    assert extract(*args) == 0
    assert len(manifest(out)) == 4


# -- 6. temporaries of killed runs ----------------------------------------------------------------

def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_dead_processes_removed_live_ones_kept(corpus, tmp_path):
    out = tmp_path / "raw"
    (out / "pool5" / "a").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, old = dead_pid(), time.time() - 3600
        files = {
            "dead": out / "pool5" / "a" / f".one.npy.{dead}.0123abcd.partial",
            "live": out / "pool5" / "a" / f".two.npy.{sleeper.pid}.0123abcd.partial",
            "fresh": out / "pool5" / f".four.npy.{dead}.89abcdef.partial",  # another machine's?
            "csv": out / f".manifest.csv.{dead}.01234567.partial",
            "other": out / "pool5" / ".notes.partial",                      # not ours
        }
        for name, path in files.items():
            path.write_bytes(b"half")
            if name != "fresh":
                os.utime(path, (old, old))
        assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 0
        left = {name for name, path in files.items() if path.exists()}
        assert left == {"live", "fresh", "other"}
        # get_avg_pool cleans its OUT the same way
        avg = tmp_path / "avg"
        avg.mkdir()
        (avg / f".x.npy.{dead}.0123abcd.partial").write_bytes(b"half")
        os.utime(avg / f".x.npy.{dead}.0123abcd.partial", (old, old))
        assert pool("-i", out, "-o", avg, "-f", "pool5") == 0
        assert not list(avg.glob(".*.partial"))
    finally:
        sleeper.kill()
        sleeper.wait()


# -- 7. get_avg_pool: output problems and float32 overflow ----------------------------------------

@pytest.fixture
def raw(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "raw"
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 0
    return out


def test_get_avg_pool_output_is_a_file(raw, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert pool("-i", raw, "-o", target, "-f", "pool5") == 2
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert extract("-i", raw.parent, "-o", target) == 2     # extract_feats: same words
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)


def test_get_avg_pool_read_only_output(raw, tmp_path, monkeypatch, capsys):
    # Tests run as root, which ignores permission bits: make opening for writing fail instead.
    def read_only(path, mode="r", *args, **kwargs):
        if "x" in mode or "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(soundnet_io, "open", read_only, raising=False)
    assert pool("-i", raw, "-o", tmp_path / "avg", "-f", "pool5") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "avg") in line and "Read-only file system" in line


def test_get_avg_pool_full_disk(raw, tmp_path, monkeypatch, capsys):
    avg = tmp_path / "avg"
    with monkeypatch.context() as m:
        full_after(2, m)
        assert pool("-i", raw, "-o", avg, "-f", "pool5") == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(avg) in line and "full" in line
    assert not list(avg.rglob("*.partial")) and len(list(avg.rglob("*.npy"))) == 2
    assert pool("-i", raw, "-o", avg, "-f", "pool5") == 0
    assert "pooled 2 files (2 skipped" in capsys.readouterr().err


def test_float64_beyond_float32_is_a_bad_file(raw, tmp_path, capsys):
    np.save(raw / "pool5" / "huge.npy", np.full((3, 256), 1e39, np.float64))
    assert pool("-i", raw, "-o", tmp_path / "avg", "-f", "pool5") == 1
    err = capsys.readouterr().err
    assert f"{raw / 'pool5' / 'huge.npy'}: pooled values beyond the float32 range" in err
    assert not (tmp_path / "avg" / "huge.npy").exists()
    assert (tmp_path / "avg" / "four.npy").exists()


# -- 8. the manifest names the input file ---------------------------------------------------------

def test_manifest_input_column(corpus, tmp_path):
    out = tmp_path / "raw"
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 0
    rows = manifest(out)
    assert {k: r["input"] for k, r in rows.items()} == {k.rsplit(".", 1)[0]: k for k in CLIPS}
    assert list(read_csv(out / "manifest.csv")[0])[:7] == extract_feats.MANIFEST_FIELDS[:7]
    listing = tmp_path / "files.txt"
    listing.write_text(f"{corpus / 'a/two.wav'}\n{corpus / 'b/three.wav'}\n")
    assert extract("--list", listing, "-o", tmp_path / "listed", "--features", "pool5") == 0
    assert {r["input"] for r in manifest(tmp_path / "listed").values()} == {"a/two.wav",
                                                                           "b/three.wav"}


def test_manifest_of_an_older_version_gets_the_column(corpus, tmp_path):
    out = tmp_path / "raw"
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 0
    old_fields = [f for f in extract_feats.MANIFEST_FIELDS if f != "input"]
    rows = read_csv(out / "manifest.csv")
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert extract("-i", corpus, "-o", out, "-f", ".wav", "--features", "pool5") == 0
    assert {r["status"]: r["input"] for r in read_csv(out / "manifest.csv")}["ok"]


# -- 9, 10. clear messages ------------------------------------------------------------------------

def test_missing_model_path_is_an_error_not_a_download(corpus, tmp_path, monkeypatch, capsys):
    def download(*_):
        raise AssertionError("downloaded")
    monkeypatch.setattr(soundnet, "download_weights", download)
    assert extract("-i", corpus, "-o", tmp_path / "out", "-f", ".wav",
                   "-m", tmp_path / "mine.npy") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"-m {tmp_path / 'mine.npy'}: no such file" in line


def test_input_that_is_a_file_suggests_its_folder_or_list(corpus, tmp_path, capsys):
    assert extract("-i", corpus / "four.wav", "-o", tmp_path / "out", "-f", ".wav") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"(-i {corpus})" in line and "--list" in line


def test_get_avg_pool_feature_folder_as_input_suggests_f(raw, tmp_path, capsys):
    assert pool("-i", raw / "pool5", "-o", tmp_path / "avg") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"-i {raw} -f pool5" in line


@pytest.mark.parametrize("flag, value", [("--min-seconds", "-1"), ("--workers", "-2"),
                                         ("--topk", "-1"), ("--batch-size", "0"),
                                         ("--min-seconds", "nan")])
def test_bad_number_names_its_flag(corpus, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        extract_feats.parse_args(["-i", str(corpus), "-o", str(tmp_path), flag, value])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]   # after the usage lines
    others = {"--min-seconds", "--workers", "--topk", "--batch-size"} - {flag}
    assert "error: " + flag in line and not any(other in line for other in others)


# -- 11. --help -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tool, n_defaults", [(extract_feats, 9), (get_avg_pool, 2)])
def test_help_states_each_default_once(tool, n_defaults, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default " not in text
    # one wording in both tools, each default stated once
    assert text.count("default") == text.count("(default: ") == n_defaults
    if tool is extract_feats:
        assert "--device {auto,cpu,cuda,cuda:N,mps} where the model runs" in text
        assert "(default: models/sound8.npy, fetched when missing" in text


# -- 12. systems without fcntl and fork (Windows) -------------------------------------------------
# Windows is simulated on Linux here: fcntl hidden, fork not offered, so soundnet_io's
# "Windows only" lock (and spawned workers) run; _windows_process_alive needs real Windows.

WINDOWS_LIKE = """
import multiprocessing, sys
sys.modules["fcntl"] = None                                # no fcntl, as on Windows
multiprocessing.get_all_start_methods = lambda: ["spawn"]  # no fork, as on Windows
_get_context = multiprocessing.get_context
def get_context(method=None):
    assert method != "fork", "fork asked for on a system without it"
    return _get_context(method)
multiprocessing.get_context = get_context
if __name__ != "__main__":   # a spawned decode worker: it must not import torch
    sys.modules["torch"] = None
sys.path.insert(0, {root!r})
import extract_feats
if __name__ == "__main__":
    sys.exit(extract_feats.main())
"""


def test_without_fcntl_and_fork_workers_and_shards_work(corpus, tmp_path):
    script = tmp_path / "windows_like.py"
    script.write_text(WINDOWS_LIKE.format(root=str(ROOT)))
    out, reference = tmp_path / "out", tmp_path / "reference"
    base = ["-i", str(corpus), "-f", ".wav", "--features", "pool5", "--quiet"]
    shards = [subprocess.Popen([sys.executable, str(script), *base, "-o", str(out), "--workers",
                                "2", "--shard", f"{k}/2"], stderr=subprocess.PIPE, text=True)
              for k in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in shards]
    assert [code for code, _ in results] == [0, 0], results
    assert not (out / ".soundnet.lock.held").exists()
    assert extract(*base[:-1], "-o", reference) == 0
    assert {row["status"] for row in manifest(out).values()} == {"ok"}
    assert set(manifest(out)) == set(manifest(reference))
    for path in (reference / "pool5").rglob("*.npy"):
        np.testing.assert_array_equal(np.load(out / path.relative_to(reference)), np.load(path))


def test_lock_file_excludes_and_takes_over_a_dead_holder(tmp_path, monkeypatch):
    """The lock without fcntl (Windows simulated on Linux: fcntl hidden)."""
    monkeypatch.setitem(sys.modules, "fcntl", None)
    held = tmp_path / ".soundnet.lock.held"
    # a holder that died: its pid is gone on this host
    held.write_text(f"{soundnet_io.socket.gethostname()} {dead_pid()} 0123")
    order = []

    def worker(name):
        with extract_feats.locked(tmp_path):
            order.append(f"{name} in")
            time.sleep(0.2)
            order.append(f"{name} out")
    with extract_feats.locked(tmp_path):   # takes over the dead holder's lock
        assert held.exists()
        threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert order == []                  # both wait while it is held
    for t in threads:
        t.join(timeout=10)
    assert sorted(order) == ["a in", "a out", "b in", "b out"]
    assert order[1].endswith("out") and order[1][0] == order[0][0]   # one at a time
    assert not held.exists()
