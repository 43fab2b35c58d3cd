"""Issue 17 (pipeline items 3, 6, 7, 10) and issue 19 item 2: device choice and its messages,
out-of-memory retries, the batch window, the writer thread, a real full disk, model threads."""
import csv
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

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


# -- 17.7: writing is off the model's path -------------------------------------------------------

def test_the_model_runs_the_next_window_while_the_last_one_is_written(tmp_path, monkeypatch):
    folder = write_clips(tmp_path / "in", 16, 1.0)   # two windows of 4 batches of 2
    next_window, calls = threading.Event(), []

    def extract_many(self, waves, layers, *args, **kwargs):
        if calls:
            next_window.set()
        calls.append(len(waves))
        return zero_features(waves, layers)
    real_save, waited = extract_feats.save_array, []

    def save_array(path, array):
        waited.append(next_window.wait(timeout=10))   # the first window's files wait for it
        real_save(path, array)
    monkeypatch.setattr(soundnet.SoundNet, "extract_many", extract_many)
    monkeypatch.setattr(extract_feats, "save_array", save_array)
    out = tmp_path / "out"
    assert extract("-i", folder, "-o", out, "-f", ".wav", "--features", "conv7",
                   "--batch-size", 2) == 0
    assert calls == [8, 8] and waited[0] and all(waited)
    assert {row["status"] for row in manifest(out).values()} == {"ok"} and len(manifest(out)) == 16


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


# -- 17.3: device choice, in words ----------------------------------------------------------------

def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips") / "in", 2, 1.0)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is built with CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_torch_without_cuda(two_clips, tmp_path, capsys, device):
    assert extract("-i", two_clips, "-o", tmp_path / "out", "-f", ".wav",
                   "--device", device) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"error: --device {device}: this torch ({torch.__version__}) is built without CUDA" \
        in line and "--device cpu" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.backends.mps.is_built(), reason="this torch is built with MPS")
def test_mps_on_a_torch_without_mps(two_clips, tmp_path, capsys):
    assert extract("-i", two_clips, "-o", tmp_path / "out", "-f", ".wav", "--device", "mps") == 2
    assert "--device mps: this torch" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", "cpu:0"])
def test_device_names_are_checked(two_clips, tmp_path, capsys, device):
    with pytest.raises(SystemExit) as stop:
        extract_feats.parse_args(["-i", str(two_clips), "-o", str(tmp_path), "--device", device])
    assert stop.value.code == 2
    assert "give auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err


def test_cuda_build_without_a_visible_gpu(two_clips, tmp_path, capsys, monkeypatch):
    # simulated: a CUDA build (the version string) on a machine whose GPUs are hidden; what
    # torch.cuda says about them is this CPU build's real answer (none)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert extract("-i", two_clips, "-o", tmp_path / "out", "-f", ".wav",
                   "--device", "cuda") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--device cuda: no GPU visible (torch built with CUDA 12.4, " \
           "CUDA_VISIBLE_DEVICES='')" in line


def test_cuda_index_beyond_the_gpus_and_a_gpu_that_fails_to_start(monkeypatch):
    # simulated: torch reports two GPUs; the device cannot start (as a broken driver)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(extract_feats.UsageError, match=r"--device cuda:2: torch sees 2 GPUs "
                       r"\(cuda:0 to cuda:1\)"):
        extract_feats.pick_device("cuda:2", torch)

    def no_driver(*args, **kwargs):
        raise RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu.")
    monkeypatch.setattr(torch, "zeros", no_driver)
    with pytest.raises(extract_feats.UsageError, match=r"--device cuda:1: the GPU failed to "
                       r"start \(CUDA driver initialization failed"):
        extract_feats.pick_device("cuda:1", torch)
    with pytest.raises(extract_feats.UsageError, match="--device cuda: the GPU failed"):
        extract_feats.pick_device("auto", torch)


# -- 17.3: out of GPU memory ----------------------------------------------------------------------

def test_out_of_memory_retries_smaller_then_alone_then_fails_that_file(tmp_path, monkeypatch,
                                                                      capsys):
    """Simulated (no GPU here): a model that runs out of memory above 2 files per batch, and
    on any batch holding the 40 s file (too large for it even alone)."""
    folder = write_clips(tmp_path / "in", 6, 2.0)
    sf.write(folder / "huge.wav", tone(40.0, seed=9), 22050)
    args = ["-i", folder, "-f", ".wav", "--features", "conv7", "--batch-size", 8]
    assert extract(*args, "-o", tmp_path / "reference") == 0
    real, calls = soundnet.SoundNet.extract_many, []

    def extract_many(self, waves, layers, *rest, batch_size, **kwargs):
        calls.append((len(waves), batch_size))
        if min(batch_size, len(waves)) > 2 or any(len(w) >= 40 * 22050 for w in waves):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, waves, layers, *rest, batch_size=batch_size, **kwargs)
    monkeypatch.setattr(soundnet.SoundNet, "extract_many", extract_many)
    capsys.readouterr()
    out = tmp_path / "out"
    assert extract(*args, "-o", out) == 1
    err = capsys.readouterr().err
    assert calls == [(7, 8), (7, 4), (7, 2), *[(1, 1)] * 7]   # 4, 2, then alone
    for size in (4, 2, 1):
        assert f"out of memory on cpu: batches of {size} files from now on" in err
    rows = manifest(out)
    assert rows.pop("huge")["error"] == (f"{folder / 'huge.wav'}: out of memory on cpu even "
                                         "alone (CUDA out of memory. Tried to allocate 9.00 GiB)")
    assert {row["status"] for row in rows.values()} == {"ok"} and len(rows) == 6
    for key in rows:
        np.testing.assert_array_equal(np.load(out / "conv7" / f"{key}.npy"),
                                      np.load(tmp_path / "reference" / "conv7" / f"{key}.npy"))
    assert "6 ok, 1 failed" in err


def test_out_of_memory_on_a_streamed_file_fails_it_and_the_next_files_are_right(
        tmp_path, monkeypatch):
    """Simulated: the streamed (long) file runs out of memory after its first chunk; the
    decode worker's remaining blocks of it must not be taken for the next file's."""
    monkeypatch.setattr(soundnet, "CHUNK_SECONDS", 20.0)
    folder = write_clips(tmp_path / "in", 3, 2.0)
    sf.write(folder / "01_long.wav", tone(65.0, seed=7), 22050)   # between 01 and 02
    args = ["-i", folder, "-f", ".wav", "--features", "conv7", "--workers", 1, "--quiet"]
    assert extract_feats.main([*map(str, args), "-o", str(tmp_path / "reference")]) == 0
    def extract_stream(self, blocks, layers, *rest, **kwargs):
        blocks = iter(blocks)
        next(blocks)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
    monkeypatch.setattr(soundnet.SoundNet, "extract_stream", extract_stream)
    out = tmp_path / "out"
    assert extract_feats.main([*map(str, args), "-o", str(out)]) == 1
    rows = manifest(out)
    assert rows["01_long"]["status"] == "failed"
    assert "out of memory on cpu even in chunks" in rows["01_long"]["error"]
    assert float(rows["01_long"]["seconds"]) == 65.0
    for key in ("00", "01", "02"):
        assert rows[key]["status"] == "ok"
        np.testing.assert_array_equal(np.load(out / "conv7" / f"{key}.npy"),
                                      np.load(tmp_path / "reference" / "conv7" / f"{key}.npy"))


# -- 17.10: model threads from the free cores -----------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_model_leaves_the_cores_other_processes_keep_busy():
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        threads = extract_feats.ModelThreads(torch, cores)
        assert torch.get_num_threads() == cores
        time.sleep(extract_feats.THREAD_INTERVAL_SECONDS + 0.2)   # every core busy, not ours
        threads.update()
        assert torch.get_num_threads() == 1
    finally:
        for process in busy:
            process.kill()
            process.wait()
        torch.set_num_threads(before)
