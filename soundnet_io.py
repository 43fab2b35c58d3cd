"""Files in and out, without torch: audio decoding and atomic output writing.

Kept apart from soundnet.py so decode worker processes and get_avg_pool.py need no torch (its
import takes seconds and about 400 MB per process). `soundnet` re-exports `load_audio`,
`open_audio` and `AudioError`.

    info, blocks = open_audio("clip.mp3")   # info.sample_rate, info.channels of the file
    for block in blocks: ...                # (n,) float32 at 22050 Hz, ~10 s each
    wave = load_audio("clip.mp3")           # the whole file, (T,) float32, = librosa.load
    wave = tile_clip(wave)                  # short clips repeated as extract_feats.py does
    save_array("out/clip.npy", features)    # a plain .npy, written atomically
"""
import ctypes
import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
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
# libsndfile's MP3 decoder gives slightly different samples (up to ~1e-4) in the MPEG frame where
# a read ends, for 8-24 kHz files; librosa.load reads the whole file in one call. So MP3s up to
# this long are read in one call too, and equal librosa.load exactly.
MP3_WHOLE_SECONDS = 240.0
CHANNEL_POLICIES = ("mean", "first")   # "first": the original Torch code's choice
MIN_SECONDS = 20.0           # the earlier port tiles clips shorter than this (see tile_clip)
TILING_RULE = ("a clip of n < L = round(min_seconds * 22050) samples is repeated whole "
               "floor(L / n) + 1 times (the earlier port's rule)")
_SIGNATURES = ((b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"), (b"\xff\xf2", "MP3"),
               (b"RIFF", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"FORM", "AIFF"))
# Containers that only ffmpeg reads (MP4/MOV: "ftyp" at byte 4; AVI: RIFF with "AVI ").
_CONTAINERS = ((b"\x1aE\xdf\xa3", "Matroska/WebM"), (b"0&\xb2u\x8ef\xcf\x11", "ASF/WMA"),
               (b"FLV", "FLV"))
FFMPEG = "ffmpeg"            # the ffmpeg program: a name looked up on PATH, or a full path
FFMPEG_INSTALL = ("install it: apt-get install ffmpeg (Debian, Ubuntu), conda install -c "
                  "conda-forge ffmpeg, or brew install ffmpeg (macOS); it must be on PATH")
_PR_SET_PDEATHSIG = 1        # from linux/prctl.h


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
    libsndfile reads WAV, FLAC, Ogg, MP3 and more; everything else (videos, AAC, Opus, ...)
    is decoded by an ffmpeg subprocess, streamed the same way. Either way the audio equals
    librosa.load(path, sr). Raises AudioError naming the file and the cause."""
    if channel not in CHANNEL_POLICIES:
        raise ValueError(f"channel must be one of {CHANNEL_POLICIES}, not {channel!r}")
    path = Path(path)
    _check_is_file(path)
    try:
        f = sf.SoundFile(path)
    except Exception as e:   # libsndfile cannot open it: ffmpeg, as librosa.load would
        info, blocks = _open_with_ffmpeg(path, block_seconds, sndfile_error=e)
        return info, _mono_resampled(blocks, info.sample_rate, sr, channel)
    info = AudioInfo(f.samplerate, f.channels)
    return info, _guard(path, _stream_blocks(f, sr, channel, block_seconds))


def load_audio(path, sr: int = SAMPLE_RATE, channel: str = "mean") -> np.ndarray:
    """The whole file as a (T,) float32 mono waveform at `sr` (see open_audio)."""
    _, blocks = open_audio(path, sr, channel)
    wave = np.concatenate([np.zeros(0, np.float32), *blocks])
    if wave.size == 0:
        raise AudioError(f"{path}: no samples (the file decodes to 0 samples)")
    return wave


def tile_clip(wave: np.ndarray, min_seconds: float = MIN_SECONDS) -> np.ndarray:
    """A short clip repeated the way the earlier PyTorch port (and the TensorFlow port before
    it) did before running the network: a clip of n < L = round(min_seconds * 22050) samples is
    repeated whole floor(L / n) + 1 times (a 5 s clip becomes 25 s, a 10 s clip 30 s); n >= L
    and min_seconds = 0 leave it as it is. wave: (T,) at 22050 Hz -> (T * repeats,).
    extract_feats.py applies this to every file, so `net.extract(tile_clip(load_audio(path)))`
    gives its arrays."""
    length = round(min_seconds * SAMPLE_RATE)
    n = wave.shape[-1]
    return np.tile(wave, length // n + 1) if 0 < n < length else wave


def _stream_blocks(f, sr: int, channel: str, block_seconds: float) -> Iterator[np.ndarray]:
    """An open SoundFile as mono blocks at `sr`, equal to librosa.load (see _mono_resampled)."""
    n = max(1, int(block_seconds * f.samplerate))
    if f.format == "MP3" and f.frames <= MP3_WHOLE_SECONDS * f.samplerate:
        n = max(n, f.frames)

    def native_blocks():
        with f:
            while True:
                # Read until a read returns nothing: libsndfile's frame count for MP3 is an
                # estimate, and soundfile.blocks() pads to it.
                block = f.read(n, dtype="float32", always_2d=True)
                if len(block) == 0:
                    return
                yield block
    return _mono_resampled(native_blocks(), f.samplerate, sr, channel)


def _mono_resampled(blocks: Iterator[np.ndarray], native_rate: int, sr: int,
                    channel: str) -> Iterator[np.ndarray]:
    """(n, channels) float32 blocks at native_rate -> (n,) float32 mono blocks at `sr`, as
    librosa.load does it: downmix, soxr HQ, then the length padded or cut to
    resampled_length(). The last block is held back so that it can be cut."""
    resampler = None if native_rate == sr else soxr.ResampleStream(
        native_rate, sr, 1, dtype="float32", quality="HQ")   # librosa's default, soxr_hq
    n_native, n_out, held = 0, 0, np.zeros(0, np.float32)
    for block in chain(blocks, [None]):
        last = block is None
        if last:
            mono = resampler.resample_chunk(np.zeros(0, np.float32), last=True) if resampler \
                else np.zeros(0, np.float32)
        else:
            n_native += len(block)
            mono = _downmix(block, channel)
            mono = resampler.resample_chunk(mono) if resampler else mono
        if len(mono):
            if len(held):
                yield held
            n_out, held = n_out + len(mono), mono
    tail = _fix_length(held, resampled_length(n_native, native_rate, sr) - (n_out - len(held)))
    if len(tail):
        yield tail


def resampled_length(n_native: int, native_rate: int, sr: int = SAMPLE_RATE) -> int:
    """Samples librosa.load(path, sr) returns for n_native samples at native_rate: it resamples
    and then pads with zeros or trims to this length (soxr's stream gives one sample fewer
    for some rates). The float expression is librosa's own, so the rounding is the same."""
    return n_native if native_rate == sr else int(np.ceil(n_native * (float(sr) / native_rate)))


def _fix_length(wave: np.ndarray, length: int) -> np.ndarray:
    """wave cut or zero-padded at the end to `length` samples."""
    if len(wave) >= length:
        return wave[:max(length, 0)]
    return np.concatenate([wave, np.zeros(length - len(wave), wave.dtype)])


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


# -- ffmpeg: every other format -----------------------------------------------------------------

def _open_with_ffmpeg(path: Path, block_seconds: float, sndfile_error: Exception):
    """Decode with an ffmpeg subprocess as librosa.load does through audioread (`ffmpeg -i FILE
    -f s16le -`): 16-bit samples at the file's own rate and channel count. Two differences that
    keep the samples: the output is WAV, so rate and channels come in its header rather than
    from parsing ffmpeg's log; and the first audio stream is taken explicitly (ffmpeg alone
    picks the one with the most channels, while audioread reports the first one's rate and
    channels). Returns (AudioInfo, iterator of (n, channels) float32 blocks at that rate)."""
    log = tempfile.TemporaryFile()   # a file, not a pipe, so ffmpeg never waits on its log
    try:
        process = subprocess.Popen(
            [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", f"file:{path}",
             "-map", "0:a:0", "-c:a", "pcm_s16le", "-f", "wav", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,   # Ctrl-C in a terminal is for us to handle, not ffmpeg
            preexec_fn=_die_with_parent())
    except OSError as e:
        log.close()
        raise AudioError(f"{path}: {_describe_failure(path, sndfile_error, None)}") from e
    try:
        rate, channels = _read_wav_header(process.stdout)
    except ValueError:   # ffmpeg stopped before any audio: it says why
        said = _ffmpeg_said(process, log, path)
        _stop(process, log)
        raise AudioError(f"{path}: {_describe_failure(path, sndfile_error, said)}") from None
    blocks = _ffmpeg_blocks(process, log, path, channels, max(1, int(block_seconds * rate)))
    weakref.finalize(blocks, _stop, process, log)   # also when it is dropped before it starts
    return AudioInfo(rate, channels), blocks


def _read_wav_header(pipe) -> tuple:
    """(sample rate, channels) from the header of ffmpeg's WAV stream, leaving the pipe at the
    first sample. ValueError when the stream ends first."""
    if pipe.read(12)[8:] != b"WAVE":
        raise ValueError("no WAV header")
    rate = channels = None
    while True:
        chunk = pipe.read(8)
        if len(chunk) < 8:
            raise ValueError("no data chunk")
        name, size = struct.unpack("<4sI", chunk)
        if name == b"data":   # of unknown size in a pipe: the samples run to the end
            if rate is None:
                raise ValueError("no fmt chunk")
            return rate, channels
        body = pipe.read(size + size % 2)
        if name == b"fmt ":
            channels, rate = struct.unpack("<HI", body[2:8])


def _ffmpeg_blocks(process, log, path: Path, channels: int, block_frames: int):
    """(n, channels) float32 blocks of ffmpeg's 16-bit samples divided by 32768, as librosa's
    buf_to_float does. ffmpeg is stopped however the iteration ends (exhausted, an error,
    or closed early by the consumer)."""
    frame_bytes = 2 * channels
    try:
        while True:
            data = process.stdout.read(block_frames * frame_bytes)
            n = len(data) // frame_bytes
            if n:
                samples = np.frombuffer(data, "<i2", count=n * channels).astype(np.float32)
                samples *= np.float32(1 / 32768)
                yield samples.reshape(n, channels)
            if len(data) < block_frames * frame_bytes:
                break
        if process.wait() != 0:   # an error after some audio: do not pass off a part as whole
            said = _ffmpeg_said(process, log, path)
            raise AudioError(f"{path}: ffmpeg failed while decoding (exit status "
                             f"{process.returncode}{': ' + said if said else ''})")
    finally:
        _stop(process, log)


def _stop(process, log):
    """Kill ffmpeg unless it has exited, reap it, close its pipe and log (again is harmless)."""
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()
    log.close()


def _ffmpeg_said(process, log, path: Path) -> str:
    """The last lines of ffmpeg's error log, without its "[demuxer @ 0x...]" and file name
    prefixes: "moov atom not found; Invalid data found when processing input"."""
    process.wait()
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - 2000))
    lines = []
    for line in log.read().decode("utf-8", "replace").splitlines():
        line = re.sub(r"^\[[^]]* @ 0x[0-9a-f]+\] ", "", line.strip())
        line = line.removeprefix(f"file:{path}: ")
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines[-3:])


def _die_with_parent():
    """A preexec_fn by which Linux kills ffmpeg when the process reading it dies (a decode
    worker or the main process, killed even with SIGKILL), so no ffmpeg outlives a run.
    Elsewhere ffmpeg stops at its next write into the closed pipe. (Linux sends the signal
    when the *thread* that started ffmpeg ends: read the blocks in the thread that opened
    the file.)"""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def set_death_signal():
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:   # the parent died before prctl took effect
            os._exit(1)
    return set_death_signal


def _check_is_file(path: Path):
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: is a directory, not an audio file" if path.is_dir()
                         else f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def _describe_failure(path: Path, error: Exception, ffmpeg_said="") -> str:
    """Words for why a file did not decode. `error` is libsndfile's; `ffmpeg_said` ffmpeg's
    error lines ("" when it was not run), or None when it is not installed. libsndfile says
    "File does not exist or is not a regular file" for a broken MP3 and ffmpeg "Invalid
    argument", so look at the bytes too."""
    with open(path, "rb") as f:
        head = f.read(12)
    if ffmpeg_said and "matches no streams" in ffmpeg_said:   # -map 0:a:0 found nothing
        return "no audio stream"
    kind = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    container = next((name for magic, name in _CONTAINERS if head.startswith(magic)), None)
    if head[4:8] == b"ftyp":
        container = "MP4/MOV"
    elif head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        kind, container = None, "AVI"
    if kind:
        detail = str(error).strip()
        misleading = not detail or "does not exist" in detail
        return f"truncated or corrupt {kind} data" + ("" if misleading else f" ({detail})")
    if ffmpeg_said is None:
        what = f"a {container} file" if container else "not a format libsndfile reads"
        return f"{what}, and ffmpeg is not installed to decode it: {FFMPEG_INSTALL}"
    said = f" (ffmpeg: {ffmpeg_said})" if ffmpeg_said else ""
    if container:
        return f"corrupt or truncated {container} container{said}"
    if ffmpeg_said:
        return f"not an audio file: neither libsndfile nor ffmpeg reads it{said}"
    return "not an audio file (its contents are not a known audio format)"


# ---------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------
METADATA_FILE = "soundnet.json"   # extract_feats.py's settings in OUT; get_avg_pool.py reads it
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
    """Write a plain .npy (readable with allow_pickle=False), atomically. A device too full
    for it raises OSError with errno ENOSPC."""
    path, array = Path(path), np.ascontiguousarray(array)
    if array.dtype == object:
        raise ValueError(f"{path}: refusing to write an object array (it would need pickle)")
    with atomic_write(path) as f:
        try:
            np.save(f, array, allow_pickle=False)
        except OSError as e:
            # numpy's tofile reports a short write ("66560 requested and 8160 written") without
            # an errno, as a full device causes it: ask the device, before the partial file is
            # removed and its space freed.
            if e.errno is None and shutil.disk_usage(path.parent).free < array.nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
            raise


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
