"""Files in and out, without torch: audio decoding and atomic output writing.

Kept apart from soundnet.py so decode worker processes and get_avg_pool.py need no torch (its
import takes seconds and about 400 MB per process). `soundnet` re-exports `load_audio`,
`open_audio` and `AudioError`.

    info, blocks = open_audio("clip.mp3")   # info.sample_rate, info.channels of the file
    for block in blocks: ...                # (n,) float32 at 22050 Hz, ~10 s each
    wave = load_audio("clip.mp3")           # the whole file, (T,) float32
    save_array("out/clip.npy", features)    # a plain .npy, written atomically
"""
import errno
import os
import re
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 22050          # Hz; the rate SoundNet was trained on

# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------
AUDIO_BLOCK_SECONDS = 10.0   # decode this much at a time: memory does not grow with file length
CHANNEL_POLICIES = ("mean", "first")   # "first": the original Torch code's choice
_SIGNATURES = ((b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"), (b"\xff\xf2", "MP3"),
               (b"RIFF", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"FORM", "AIFF"))


class AudioError(Exception):
    """An input that cannot be decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    """What the file holds before downmixing and resampling."""
    sample_rate: int
    channels: int


def open_audio(path, sr: int = SAMPLE_RATE, channel: str = "mean",
               block_seconds: float = AUDIO_BLOCK_SECONDS):
    """Open an audio file for streaming. Returns (AudioInfo, iterator of (n,) float32 mono
    blocks at `sr`); values are as decoded (MP3s may exceed [-1, 1] slightly).
    libsndfile reads WAV, FLAC, Ogg, MP3 and more; other formats go through librosa's
    audioread fallback (ffmpeg), whole. Raises AudioError naming the file and the cause."""
    if channel not in CHANNEL_POLICIES:
        raise ValueError(f"channel must be one of {CHANNEL_POLICIES}, not {channel!r}")
    path = Path(path)
    _check_is_file(path)
    try:
        f = sf.SoundFile(path)
    except Exception as e:   # libsndfile cannot open it: try audioread, else explain
        return _open_with_librosa(path, sr, channel, e)
    info = AudioInfo(f.samplerate, f.channels)
    return info, _guard(path, _stream_blocks(f, sr, channel, block_seconds))


def load_audio(path, sr: int = SAMPLE_RATE, channel: str = "mean") -> np.ndarray:
    """The whole file as a (T,) float32 mono waveform at `sr` (see open_audio)."""
    _, blocks = open_audio(path, sr, channel)
    wave = np.concatenate([np.zeros(0, np.float32), *blocks])
    if wave.size == 0:
        raise AudioError(f"{path}: no samples (the file decodes to 0 samples)")
    return wave


def _stream_blocks(f, sr: int, channel: str, block_seconds: float) -> Iterator[np.ndarray]:
    with f:
        resampler = None if f.samplerate == sr else soxr.ResampleStream(
            f.samplerate, sr, 1, dtype="float32", quality="HQ")   # librosa's default, soxr_hq
        n = max(1, int(block_seconds * f.samplerate))
        while True:
            # Read until a read returns nothing: libsndfile's frame count for MP3 is an
            # estimate, and soundfile.blocks() pads to it.
            block = f.read(n, dtype="float32", always_2d=True)
            last = len(block) == 0
            mono = _downmix(block, channel)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            if len(mono):
                yield mono
            if last:
                return


def _downmix(block: np.ndarray, channel: str) -> np.ndarray:
    """(n, channels) -> (n,) float32. Sums channel columns one at a time: block.mean(axis=1)
    (the same values up to float rounding) costs more than decoding the MP3 itself."""
    if channel == "first" or block.shape[1] == 1:
        return np.ascontiguousarray(block[:, 0], dtype=np.float32)
    mono = block[:, 0] + block[:, 1]
    for c in range(2, block.shape[1]):
        mono += block[:, c]
    mono /= block.shape[1]
    return mono.astype(np.float32, copy=False)


def _guard(path: Path, blocks: Iterator) -> Iterator:
    try:
        yield from blocks
    except Exception as e:
        raise AudioError(f"{path}: {_describe_failure(path, e)}") from e


def _open_with_librosa(path: Path, sr: int, channel: str, sndfile_error: Exception):
    import librosa   # imported here: slow to import, and only needed for unusual formats
    try:
        with warnings.catch_warnings():   # "PySoundFile failed. Trying audioread instead."
            warnings.simplefilter("ignore")
            wave, native_sr = librosa.load(path, sr=None, mono=False)
    except Exception as e:
        raise AudioError(f"{path}: {_describe_failure(path, sndfile_error)}") from e
    block = wave[:, None] if wave.ndim == 1 else wave.T
    mono = _downmix(block, channel)
    if native_sr != sr:
        mono = soxr.resample(mono, native_sr, sr, quality="HQ")
    return AudioInfo(int(native_sr), block.shape[1]), iter([mono])


def _check_is_file(path: Path):
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: is a directory, not an audio file" if path.is_dir()
                         else f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def _describe_failure(path: Path, error: Exception) -> str:
    """Words for why a file did not decode. libsndfile says "File does not exist or is not a
    regular file" for a broken MP3 and audioread's errors can be empty, so look at the bytes."""
    with open(path, "rb") as f:
        head = f.read(12)
    kind = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    if head[4:8] == b"ftyp":
        return "unsupported format (MP4/M4A): libsndfile cannot read it; install ffmpeg to decode it"
    if kind:
        detail = str(error).strip()
        misleading = not detail or "does not exist" in detail
        return f"truncated or corrupt {kind} data" + ("" if misleading else f" ({detail})")
    return "not an audio file (its contents are not a known audio format)"


# ---------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------
FULL_DEVICE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# An interrupted writer's temporary: .<name>.<pid>.<8 hex>.partial (see atomic_write).
PARTIAL_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.partial$", re.DOTALL)
# A temporary of a process not running on this machine is removed only when nothing has written
# to it for this long: a --shard process on another machine sharing OUT has a pid this machine
# cannot see, but its temporary keeps changing while it writes.
STALE_PARTIAL_SECONDS = 60.0

@contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """Open a temporary file beside `path` for writing; when the block ends without error it is
    flushed to disk and renamed over `path`, else removed. So a crash, Ctrl-C or a full disk
    never leaves a truncated `path`. The temporary name starts with "." and ends ".partial"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_array(path, array: np.ndarray):
    """Write a plain .npy (readable with allow_pickle=False), atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype == object:
        raise ValueError(f"{path}: refusing to write an object array (it would need pickle)")
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def write_failure(error: OSError, folder) -> str:
    """One line for an output write that failed, naming the output folder: says when its
    device is full (or over quota)."""
    if error.errno in FULL_DEVICE_ERRNOS:
        return f"{folder}: the output folder is full (no space left on its device)"
    return f"{folder}: cannot write there ({error.strerror or error})"


def remove_stale_partials(folder, min_age: float = STALE_PARTIAL_SECONDS) -> int:
    """Delete the temporaries that killed writers left under `folder`: those whose process is
    not running on this machine and that were last written over `min_age` seconds ago.
    Returns how many were removed."""
    removed = 0
    now = time.time()
    for path in Path(folder).rglob(".*.partial"):
        match = PARTIAL_NAME.match(path.name)
        if not match or process_alive(int(match.group(1))):
            continue
        try:
            if now - path.stat().st_mtime > min_age:
                path.unlink()
                removed += 1
        except FileNotFoundError:   # another process removed it first
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (when unsure: True)."""
    if pid <= 0:
        return False
    if os.name == "nt":   # os.kill(pid, 0) would terminate the process on Windows
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)   # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.GetLastError() == 5   # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return not ok or code.value == 259   # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by another user
        return True
    return True
