"""Issue 19, the process lifecycle items (numbered as there): real signals to a real
extract_feats.py, real killed workers, and what a re-run makes of what they leave."""
import csv
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
from conftest import ROOT, tone

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads process states from /proc")


def clips(folder, n, seconds):
    folder.mkdir(parents=True)
    for i in range(n):
        sf.write(folder / f"{i:02d}.wav", tone(seconds, seed=i), 22050)
    return folder


def start(folder, out, *args):
    """The real script in a process of its own, on the CPU (whatever this machine has)."""
    return subprocess.Popen([sys.executable, str(ROOT / "extract_feats.py"), "-i", str(folder),
                             "-o", str(out), "-f", ".wav", "--device", "cpu", "--quiet",
                             *map(str, args)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)


def main(*args):
    return extract_feats.main([*map(str, args), "--quiet", "--workers", "0"])


def manifest(out):
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def saved(out, feature="conv7"):
    return {p.stem: np.load(p, allow_pickle=False) for p in (out / feature).glob("*.npy")}


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not (result := condition()):
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)
    return result


def proc(pid, name):
    """The text of /proc/<pid>/<name>, "" when the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def children(pid):
    """Live processes whose parent is pid (its decode workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc(entry, "stat").rsplit(")", 1)[-1].split()
            if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def alive(pids):
    """Those of pids still running (not gone, not a zombie), whoever their parent is now."""
    return [p for p in pids if proc(p, "stat").rsplit(")", 1)[-1].split()[:1] not in ([], ["Z"])]


def handles(pid, sig) -> bool:
    """Whether the process has a handler for sig (SigCgt in /proc/<pid>/status)."""
    line = next((l for l in proc(pid, "status").splitlines() if l.startswith("SigCgt:")), "")
    return bool(line) and bool(int(line.split()[1], 16) >> (sig - 1) & 1)


# -- 3. decode workers do not outlive a killed run ------------------------------------------------

@linux_only
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_decode_workers_die_with_a_killed_run(tmp_path, sig):
    # 40 clips, 2 workers: the first window holds 32 files, so while they are saved each worker
    # has decoded all its files and waits for the main process to take the last ones
    folder, out = clips(tmp_path / "in", 40, 1.0), tmp_path / "out"
    process = start(folder, out, "--workers", 2, "--features", "conv7", "--min-seconds", 0)
    workers = []
    try:
        workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid),
                           60, "workers")
        wait_for(lambda: list((out / "conv7").glob("*.npy")), 120, "output")
        os.kill(process.pid, sig)
        code = process.wait(timeout=60)
        deadline = time.time() + 10
        while alive(workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(workers), f"workers {alive(workers)} outlived the run"
    finally:
        for pid in alive(workers):   # left by a failure: not for the next tests
            os.kill(pid, signal.SIGKILL)
        process.kill()
    if sig == signal.SIGTERM:
        assert code == 143, process.stderr.read()


# -- 4. Ctrl-C or SIGTERM: the files already decoded are finished ---------------------------------

def stop_while_decoded_files_wait(tmp_path, *signals):
    """A run of 40 clips of 1 s gets `signals`, a tenth of a second apart, soon after its
    handlers are in place: the workers have files ready, so the main process has received some
    by then, and the first window (32 files tiled to 11 s) keeps the model busy for seconds, so
    none is written yet. Returns (process, stderr, out)."""
    folder, out = clips(tmp_path / "in", 40, 1.0), tmp_path / "out"
    process = start(folder, out, "--workers", 2, "--features", "conv7", "--min-seconds", 10)
    try:
        wait_for(lambda: handles(process.pid, signal.SIGTERM), 120, "SIGTERM handler")
        time.sleep(0.1)
        assert not list(out.glob("conv7/*.npy")), "this machine ran the window before the signal"
        for sig in signals:
            os.kill(process.pid, sig)
            time.sleep(0.1)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert not list(out.rglob("*.partial"))
    return process, stderr, out


@linux_only
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_finishes_the_files_already_decoded(tmp_path, sig, code):
    process, stderr, out = stop_while_decoded_files_wait(tmp_path, sig)
    assert process.returncode == code and "(interrupted)" in stderr, stderr
    done = saved(out)
    assert 1 <= len(done) < 40, stderr
    assert set(manifest(out)) == set(done)
    assert {row["status"] for row in manifest(out).values()} == {"ok"}
    assert f"{len(done)} ok, 0 failed, 0 skipped" in stderr
    assert main("-i", out.parent / "in", "-o", out, "-f", ".wav", "--features", "conv7",
                "--min-seconds", 10) == 0
    assert len(saved(out)) == 40


@linux_only
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    process, stderr, out = stop_while_decoded_files_wait(tmp_path, signal.SIGINT, signal.SIGINT)
    assert process.returncode == 130 and "(interrupted)" in stderr, stderr
    assert "Ctrl-C again stops at once" in stderr
    done = saved(out)
    assert len(done) < 32   # the window did not run to its end
    assert set(manifest(out) if done else {}) == set(done)


# -- 18. a dead decode worker: its file fails, the run goes on ------------------------------------

@linux_only
def test_a_killed_decode_worker_fails_its_file_and_the_run_goes_on(tmp_path):
    # 12 s clips (4 messages each), windows of 4 files: when the first file is written, worker 0
    # is 6 files ahead of the model, in the middle of its 10
    folder, out = clips(tmp_path / "in", 20, 12.0), tmp_path / "out"
    args = ["--features", "conv7", "--min-seconds", 0, "--batch-size", 1]
    process = start(folder, out, "--workers", 2, *args)
    try:
        workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid),
                           60, "workers")
        wait_for(lambda: list((out / "conv7").glob("*.npy")), 120, "output")
        os.kill(min(workers), signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    rows = manifest(out)
    failed = [row for row in rows.values() if row["status"] == "failed"]
    assert process.returncode == 1 and len(rows) == 20 and len(failed) == 1, stderr
    assert failed[0]["error"] == (f"{folder / failed[0]['input']}: the decoder process died on "
                                  "this file (killed by SIGKILL)")
    assert f"failed: {failed[0]['error']}" in stderr and "19 ok, 1 failed" in stderr
    reference = tmp_path / "reference"
    assert main("-i", folder, "-o", reference, "-f", ".wav", *args) == 0
    got, want = saved(out), saved(reference)
    assert set(got) == set(want) - {failed[0]["path"]}
    for key, array in got.items():   # those decoded again by the new worker too
        np.testing.assert_array_equal(array, want[key])


# -- 25. killed between a file's arrays and its manifest row --------------------------------------

KILLED_BEFORE_ROW = """
import os, signal, sys
sys.path.insert(0, {root!r})
import extract_feats
append = extract_feats.CsvLog.append
def append_or_die(self, rows):
    rows = list(rows)
    if self.path.name == "manifest.csv" and rows[0]["path"] == {key!r}:
        os.kill(os.getpid(), signal.SIGKILL)   # its arrays are written, its row is not
    return append(self, rows)
extract_feats.CsvLog.append = append_or_die
sys.exit(extract_feats.main())
"""


def test_arrays_without_their_manifest_row_are_made_again(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (rate, channels) in enumerate([(44100, 2), (48000, 1), (22050, 1)]):
        sf.write(folder / f"{i}.wav", tone(2.0 + i, sr=rate, channels=channels, seed=i), rate)
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = ["-i", folder, "-f", ".wav", "--features", "pool5", "conv7"]
    script = tmp_path / "killed_before_row.py"
    script.write_text(KILLED_BEFORE_ROW.format(root=str(ROOT), key="1"))
    killed = subprocess.run([sys.executable, str(script), *map(str, args), "-o", str(out),
                             "--workers", "0", "--quiet"], cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "conv7" / "1.npy").exists() and "1" not in manifest(out)

    capsys.readouterr()
    assert main(*args, "-o", out) == 0
    assert "2 ok, 0 failed, 1 skipped" in capsys.readouterr().err
    assert main(*args, "-o", reference) == 0
    assert manifest(out) == manifest(reference)

    # an OUT a kill and an earlier version left with an empty row: made again too
    rows = list(manifest(out).values())
    rows[1] = {**rows[1], **dict.fromkeys(["seconds", "sample_rate", "channels", "frames"], ""),
               "status": "skipped"}
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, extract_feats.MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    assert main(*args, "-o", out) == 0
    assert "1 ok, 0 failed, 2 skipped" in capsys.readouterr().err
    assert manifest(out) == manifest(reference)


# -- 5. a re-run keeps `ok` in the manifest -------------------------------------------------------

def test_a_rerun_keeps_ok_and_counts_its_skips_in_the_summary(tmp_path, capsys):
    folder, out = clips(tmp_path / "in", 3, 1.0), tmp_path / "out"
    args = ["-i", folder, "-o", out, "-f", ".wav", "--features", "pool5"]
    assert main(*args) == 0
    first = manifest(out)
    capsys.readouterr()
    assert main(*args) == 0
    assert "0 ok, 0 failed, 3 skipped" in capsys.readouterr().err
    assert manifest(out) == first and {row["status"] for row in first.values()} == {"ok"}


# -- 26. --topk on a re-run with an unreadable head array -----------------------------------------

def test_topk_rerun_extracts_again_a_file_whose_head_array_is_unreadable(tmp_path, capsys):
    folder, out = clips(tmp_path / "in", 3, 1.0), tmp_path / "out"
    args = ["-i", folder, "-o", out, "-f", ".wav", "--features", "y_obj", "y_scns"]
    assert main(*args) == 0
    broken = out / "y_obj" / "01.npy"
    good = np.load(broken)
    broken.write_bytes(broken.read_bytes()[:200])   # cut by something else than this tool
    capsys.readouterr()
    assert main(*args, "--topk", 2) == 0
    err = capsys.readouterr().err
    assert f"{broken}: unreadable (" in err and "extracting 01.wav again" in err
    assert "1 ok, 0 failed, 2 skipped" in err
    np.testing.assert_array_equal(np.load(broken), good)
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        ranked = {(row["path"], row["head"]) for row in csv.DictReader(f)}
    assert ranked == {(f"{i:02d}", head) for i in range(3) for head in ("y_obj", "y_scns")}
