"""Files in and out, without torch: audio decoding, output-folder safety for both command-line
tools (atomic writes, the lock, CSV logs), pooling frames onto a time grid, and reading pickled
arrays without running code.

Kept apart from soundnet.py so decode worker processes and get_avg_pool.py need no torch (its
import takes seconds and hundreds of MB per process: docs/performance.md, Memory). `soundnet`
re-exports `load_audio`, `open_audio`, `AudioError` and `pool_windows`.

    info, blocks = open_audio("clip.mp3")   # info.sample_rate, info.channels of the file
    for block in blocks: ...                # (n,) float32 at 22050 Hz, ~10 s each
    wave = load_audio("clip.mp3")           # the whole file, (T,) float32, = librosa.load
    wave = tile_clip(wave)                  # short clips repeated as extract_feats.py does
    save_array("out/clip.npy", features)    # a plain .npy, written atomically
    rows = pool_windows(frames, layer, seconds, hop=1.0)   # (ceil(seconds), C): 1-s segments
"""
import csv
import ctypes
import errno
import importlib
import io
import math
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 22050          # Hz; the rate SoundNet was trained on
# soundnet.py's defaults, here so that extract_feats.py can read them before it imports torch
# (its decode workers fork first). soundnet re-exports them.
DEFAULT_FEATURES = ("conv7", "y_obj", "y_scns")
# `extract` runs inputs longer than this (plus the deepest layer's receptive field) in chunks.
CHUNK_SECONDS = 240.0
# `extract` of a list of waveforms: at most this many per network call. A call has a fixed cost,
# mostly reading the heads' weights, that the batch shares (what that gains: docs/performance.md,
# the default against --batch-size 1).
BATCH_SIZE = 8

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
RESAMPLING_RULE = ("librosa.load(path, sr=22050, mono=True) of librosa >= 0.10: mean of the "
                   "channels, soxr HQ, then padded or cut to ceil(n * 22050 / rate) samples")
_SIGNATURES = ((b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"), (b"\xff\xf2", "MP3"),
               (b"RIFF", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"FORM", "AIFF"))
# Containers that only ffmpeg reads (MP4/MOV: "ftyp" at byte 4; AVI: RIFF with "AVI ").
_CONTAINERS = ((b"\x1aE\xdf\xa3", "Matroska/WebM"), (b"0&\xb2u\x8ef\xcf\x11", "ASF/WMA"),
               (b"FLV", "FLV"))
FFMPEG = "ffmpeg"            # the ffmpeg program: a name looked up on PATH, or a full path
PROBE_TIMEOUT = 30.0         # seconds ffprobe may take to report a container's duration
FFMPEG_INSTALL = ("install it: apt-get install ffmpeg (Debian, Ubuntu), conda install -c "
                  "conda-forge ffmpeg, or brew install ffmpeg (macOS); it must be on PATH")
_PR_SET_PDEATHSIG = 1        # from linux/prctl.h
# WAV encodings whose data chunk is frames of block-align bytes each: PCM, IEEE float, A-law,
# mu-law, and the extensible header (PCM or float inside); and data sizes that mean "unknown".
_WAV_FRAMED_TAGS = (0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE)
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


class AudioError(Exception):
    """An input that cannot be decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    """What the file holds before downmixing and resampling."""
    sample_rate: int
    channels: int
    # The container's duration as ffmpeg reports it, for files ffmpeg decodes (None otherwise,
    # or when the container does not say): a video's picture may last longer than its audio.
    container_seconds: Optional[float] = None


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
        # The name's bytes: soundfile encodes a str as UTF-8, which names that are not UTF-8
        # (surrogate-escaped in Python) fail.
        f = sf.SoundFile(path if os.name == "nt" else os.fsencode(path))
    except Exception as e:   # libsndfile cannot open it: ffmpeg, as librosa.load would
        info, blocks = _open_with_ffmpeg(path, block_seconds, sndfile_error=e)
        return info, _mono_resampled(blocks, info.sample_rate, sr, channel)
    declared = _wav_declared_frames(path)
    if declared is not None and f.frames < declared:   # libsndfile reads what is there
        f.close()
        raise AudioError(f"{path}: truncated WAV data: its header declares {declared} frames "
                         f"({declared / f.samplerate:.3f} s), the file holds {f.frames}")
    info = AudioInfo(f.samplerate, f.channels)
    return info, _guard(path, _stream_blocks(f, sr, channel, block_seconds))


def _wav_declared_frames(path: Path):
    """The frame count a RIFF WAVE file's header declares (data chunk bytes / block align), or
    None when it declares none: another format, a size left unknown by a streaming writer
    (0 or 0xFFFFFFFF), or a compressed encoding, where bytes do not give frames."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        block_align = None
        while len(chunk := f.read(8)) == 8:
            name, size = struct.unpack("<4sI", chunk)
            if name == b"data":
                known = block_align and size not in _WAV_UNKNOWN_SIZES
                return size // block_align if known else None
            if name == b"fmt ":
                fmt = f.read(size + size % 2)
                if len(fmt) < 14:
                    return None
                tag, _, _, _, block_align = struct.unpack("<HHIIH", fmt[:14])
                if tag not in _WAV_FRAMED_TAGS:
                    return None
            else:
                f.seek(size + size % 2, os.SEEK_CUR)
    return None


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
    probe = _start_duration_probe(path)   # runs beside ffmpeg
    try:
        rate, channels = _read_wav_header(process.stdout)
    except ValueError:   # ffmpeg stopped before any audio: it says why
        said = _ffmpeg_said(process, log, path)
        _stop(process, log)
        _probed_seconds(probe, cancel=True)
        raise AudioError(f"{path}: {_describe_failure(path, sndfile_error, said)}") from None
    blocks = _ffmpeg_blocks(process, log, path, channels, max(1, int(block_seconds * rate)))
    weakref.finalize(blocks, _stop, process, log)   # also when it is dropped before it starts
    return AudioInfo(rate, channels, _probed_seconds(probe)), blocks


def _start_duration_probe(path: Path):
    """An ffprobe process asked for the container's duration (what ffmpeg reports as
    `Duration:`), or None when ffprobe, installed beside ffmpeg, is missing."""
    ffmpeg = Path(FFMPEG)
    ffprobe = str(ffmpeg.with_name(ffmpeg.name.replace("ffmpeg", "ffprobe")))
    try:
        return subprocess.Popen(
            [ffprobe, "-v", "error", "-show_entries", "format=duration",
             "-of", "default=noprint_wrappers=1:nokey=1", f"file:{path}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent())
    except OSError:
        return None


def _probed_seconds(probe, cancel: bool = False) -> Optional[float]:
    """The duration in seconds that `probe` reports; None when it cannot say ("N/A" for a
    stream without a container duration), fails, or is cancelled."""
    if probe is None:
        return None
    if cancel:
        probe.kill()
    try:
        said, _ = probe.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.communicate()
        return None
    try:
        seconds = float(said.strip() or "nan")
    except ValueError:
        return None
    return seconds if probe.returncode == 0 and math.isfinite(seconds) and seconds >= 0 else None


def ffmpeg_version() -> Optional[str]:
    """The version of FFMPEG ("5.1.6-0+deb12u1"), or None when it is not installed."""
    try:
        said = subprocess.run([FFMPEG, "-version"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=PROBE_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = said.decode("utf-8", "replace").split()
    return words[2] if words[:2] == ["ffmpeg", "version"] and len(words) > 2 else None


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
    prctl, parent = _prctl(), os.getpid()   # looked up here: no dlopen in a forked child
    return lambda: _set_death_signal(prctl, parent)


def die_with_parent(parent: int):
    """On Linux, have the kernel SIGKILL this process when the thread of process `parent` that
    started it ends (for its main thread: when `parent` dies, even by SIGKILL); exit at once if
    `parent` is gone already. Elsewhere nothing: the caller must watch its parent itself."""
    if sys.platform.startswith("linux"):
        _set_death_signal(_prctl(), parent)


def _prctl():
    return ctypes.CDLL(None, use_errno=True).prctl


def _set_death_signal(prctl, parent: int):
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)


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
        first_bytes = f.read(12)
    if ffmpeg_said and "matches no streams" in ffmpeg_said:   # -map 0:a:0 found nothing
        return "no audio stream"
    kind = next((name for magic, name in _SIGNATURES if first_bytes.startswith(magic)), None)
    container = next((name for magic, name in _CONTAINERS if first_bytes.startswith(magic)),
                     None)
    if first_bytes[4:8] == b"ftyp":
        container = "MP4/MOV"
    elif first_bytes.startswith(b"RIFF") and first_bytes[8:12] == b"AVI ":
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
# Both command-line tools keep their output folder safe with these: every file is written
# atomically (atomic_write, save_array, write_text_atomic), temporaries of killed writers are
# removed (remove_stale_partials), CSV logs are appended and compacted under a lock that --shard
# processes share (CsvLog, locked), and a settings record in OUT says how its files were made.
# When that record names other settings than a run's, the two tools differ, on purpose:
# - extract_feats.py (OUT/soundnet.json, its write_metadata) refuses the run unless --force:
#   its arrays are expensive to make (decoding and the network, hours for a large corpus) and
#   are the data everything else is derived from.
# - get_avg_pool.py (OUT/pooling.json, its claim_output) deletes the old vectors silently and
#   pools again: they are cheap to recompute, and derived from RAW, which stays as it is.
METADATA_FILE = "soundnet.json"   # extract_feats.py's settings in OUT; get_avg_pool.py reads it
FULL_DEVICE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# An interrupted writer's temporary: .<name>.<pid>.<8 hex>.partial (see atomic_write).
PARTIAL_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.partial$", re.DOTALL)
# A temporary of a process not running on this machine is removed only when nothing has written
# to it for this long: a --shard process on another machine sharing OUT has a pid this machine
# cannot see, but its temporary keeps changing while it writes.
STALE_PARTIAL_SECONDS = 60.0
CSV_LINE_END = "\n"   # as every other file here; the csv module's default is "\r\n"
# Spreadsheets run a cell starting with = + - @ (or tab, CR) as a formula: such cells, and those
# starting with the escape itself, are written with CSV_ESCAPE in front (see csv_cell).
CSV_ESCAPE = "'"
CSV_ESCAPED_STARTS = ("=", "+", "-", "@", "\t", "\r", CSV_ESCAPE)
LOCK_FILE = ".soundnet.lock"   # in OUT: see locked

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


def write_text_atomic(path, text: str):
    """Write `text` to `path` as UTF-8, atomically (see atomic_write), line ends as they are;
    surrogateescape: file names that are not valid UTF-8 still round-trip."""
    with atomic_write(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


def csv_cell(value) -> str:
    """A value as a CSV cell that a spreadsheet shows as text: one starting like a formula
    (= + - @, tab, carriage return) gets a leading "'", as spreadsheets themselves escape it;
    so does one starting with "'", so that csv_value(csv_cell(v)) == str(v) for every v."""
    text = str(value)
    return CSV_ESCAPE + text if text.startswith(CSV_ESCAPED_STARTS) else text


def csv_value(cell: str) -> str:
    """The value csv_cell wrote: a leading "'" removed."""
    return cell[1:] if cell.startswith(CSV_ESCAPE) else cell


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
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by another user
        return True
    return True


class CsvLog:
    """A CSV written as you go (rows appended under the lock, so an interrupted run keeps what
    it did) and compacted at the end of a run: the last row per key, sorted, atomically."""

    def __init__(self, path: Path, fields, key_fields):
        self.path, self.fields, self.key_fields = path, fields, key_fields

    def append(self, rows):
        """Whole rows or nothing: a write that fails (full disk) is cut back off the file."""
        text = io.StringIO()
        self._write(text, rows)
        with locked(self.path.parent), open(self.path, "ab", buffering=0) as f:
            start = f.seek(0, os.SEEK_END)
            header = "" if start else ",".join(self.fields) + CSV_LINE_END
            try:
                write_all(f, (header + text.getvalue()).encode("utf-8", "surrogateescape"))
            except OSError:
                f.truncate(start)
                raise

    def rows(self) -> dict:
        """{key: last row for it}, the values as written (csv_cell's escape undone). Reads
        the CRLF line ends of older versions too."""
        if not self.path.exists():
            return {}
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = ({k: csv_value(v) if isinstance(v, str) else v for k, v in r.items()}
                    for r in csv.DictReader(f))
            return {tuple(r[k] for k in self.key_fields): r for r in rows}

    def _write(self, f, rows):
        """rows (dicts) into f, with "\n" line ends and cells escaped by csv_cell."""
        csv.DictWriter(f, self.fields, extrasaction="ignore", lineterminator=CSV_LINE_END
                       ).writerows({k: "" if v is None else csv_cell(v) for k, v in row.items()}
                                   for row in rows)

    def has_header(self) -> bool:
        """Whether the file is missing or starts with this log's header (an older manifest
        has fewer columns: compact it before appending)."""
        if not self.path.exists():
            return True
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return next(csv.reader(f), None) == self.fields

    def compact(self, keep=lambda row: True):
        """Rewrite the file: the last row per key for which keep(row), sorted."""
        with locked(self.path.parent):
            rows = self.rows()
            with atomic_write(self.path, "w", newline="", encoding="utf-8",
                              errors="surrogateescape") as f:
                f.write(",".join(self.fields) + CSV_LINE_END)
                self._write(f, (row for _, row in sorted(rows.items()) if keep(row)))


def write_all(f, data: bytes):
    """Write all of `data` to the unbuffered binary file f (a raw write may write less)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


@contextmanager
def locked(out: Path):
    """Serialise manifest and metadata updates between --shard processes on one OUT.
    Where the system has fcntl (Linux, macOS, BSD): flock on OUT/.soundnet.lock, which the
    kernel releases when its holder dies. Elsewhere (Windows): see lock_file."""
    try:
        import fcntl
    except ImportError:
        with lock_file(out / f"{LOCK_FILE}.held"):
            yield
        return
    with open(out / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- Windows only: no fcntl, no os.kill(pid, 0) --------------------------------------------------
# The tests run this code on Linux with fcntl hidden (tests/test_cli_robustness.py, section 12);
# _windows_process_alive runs on Windows alone.
# Without fcntl the lock is a file created exclusively. Holders keep it for milliseconds, so
# one this old was left by a process that died (on any machine).
STALE_LOCK_SECONDS = 600.0


@contextmanager
def lock_file(path: Path, poll: float = 0.02):
    """A lock held by creating `path` exclusively (O_CREAT | O_EXCL: atomic on every system
    and on network file systems), holding "host pid token". A waiter takes over one whose
    holder died: a pid not running on this host, or older than STALE_LOCK_SECONDS."""
    me = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            remove_if_stale(path)
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def remove_if_stale(path: Path):
    """Remove the lock file `path` if its holder died (see lock_file), unless it was taken
    again meanwhile."""
    try:
        holder = path.read_text(encoding="utf-8")
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, UnicodeDecodeError):
        return
    host, _, rest = holder.partition(" ")
    pid = rest.split(" ")[0]
    dead = host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))
    # An empty holder: created, not yet written (or died in between).
    if dead or age > (STALE_LOCK_SECONDS if holder else 10.0):
        try:
            if path.read_text(encoding="utf-8") == holder:   # not retaken meanwhile
                path.unlink()
        except FileNotFoundError:
            pass


def _windows_process_alive(pid: int) -> bool:
    """process_alive on Windows, through kernel32 (when unsure: True)."""
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)   # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.GetLastError() == 5   # access denied: it exists
    code = ctypes.c_ulong()
    ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    kernel32.CloseHandle(handle)
    return not ok or code.value == 259   # STILL_ACTIVE


# ---------------------------------------------------------------------------------------------
# Frames on a time grid
# ---------------------------------------------------------------------------------------------
# Each pool mode is a sequence of reductions over frames, concatenated in this order.
POOLS = {"mean": ("mean",), "max": ("max",), "meanmax": ("mean", "max"), "meanstd": ("mean", "std")}
# A window and a frame's cell that only touch (float rounding of their shared edge) do not
# overlap. Far below one sample (45 us), so no real overlap is lost.
OVERLAP_EPSILON = 1e-9       # seconds
SHORTEST_WINDOW = 1 / SAMPLE_RATE   # seconds: a window or hop shorter than a sample holds no audio
POOL_CHUNK_VALUES = 1 << 22  # frame values gathered at once by pool_windows (32 MB in float64)


@dataclass(frozen=True)
class FrameGrid:
    """Where a feature's frames sit in time: frame n is centred at first_centre_seconds + n *
    hop_seconds. soundnet.get_layer(name) has the same two attributes, and can be used instead."""
    hop_seconds: float
    first_centre_seconds: float

    @classmethod
    def from_metadata(cls, feature: dict) -> "FrameGrid":
        """From a feature's entry in soundnet.json; KeyError, TypeError or ValueError when the
        entry lacks the two numbers."""
        grid = cls(float(feature["hop_seconds"]), float(feature["first_frame_centre_seconds"]))
        if not (grid.hop_seconds > 0 and math.isfinite(grid.first_centre_seconds)):
            raise ValueError(f"not a frame geometry: {grid}")
        return grid


def check_grid(hop, window=None):
    """ValueError, in words for a user, unless hop and window (seconds; None: = hop) are
    finite and at least one sample long."""
    for name, value in (("hop", hop), ("window", hop if window is None else window)):
        try:
            positive = math.isfinite(value) and value > 0
        except TypeError:
            positive = False
        if not positive:
            raise ValueError(f"the {name} must be a positive number of seconds, not {value!r}")
        if value < SHORTEST_WINDOW:
            raise ValueError(f"the {name} of {value:g} s is shorter than one sample "
                             f"(1/{SAMPLE_RATE} s): its windows would hold no audio")


def window_count(duration_seconds: float, hop: float) -> int:
    """ceil(duration / hop), exact for decimal values: a 10.0 s clip with hop 0.04 gives 250
    windows, where float division (250.00000000000003) could give 251."""
    duration, step = Fraction(repr(float(duration_seconds))), Fraction(repr(float(hop)))
    return max(0, math.ceil(duration / step))


def window_weights(starts: np.ndarray, ends: np.ndarray, n_frames: int, grid) -> tuple:
    """The frames that pool each window [starts[i], ends[i]) seconds: (indices, weights), both
    (k, m), the weights being the seconds by which each frame's cell [t_n - hop/2, t_n + hop/2)
    overlaps the window (0: not part of it). A window that no cell overlaps gets the frame
    whose centre is nearest the window's centre, with weight 1."""
    hop, first = grid.hop_seconds, grid.first_centre_seconds
    # The frames whose cells can overlap, with a frame of margin each side for rounding.
    span = math.ceil(float((ends - starts).max(initial=0)) / hop) + 3
    lowest = np.floor((starts - first) / hop - 0.5).astype(np.int64) - 1
    candidates = lowest[:, None] + np.arange(span)
    centres = first + candidates * hop
    overlap = (np.minimum(ends[:, None], centres + hop / 2)
               - np.maximum(starts[:, None], centres - hop / 2))
    weights = np.where((overlap > OVERLAP_EPSILON) & (candidates >= 0) & (candidates < n_frames),
                       overlap, 0.0)
    indices = np.clip(candidates, 0, n_frames - 1)
    empty = ~weights.any(axis=1)
    nearest = np.rint(((starts[empty] + ends[empty]) / 2 - first) / hop).astype(np.int64)
    indices[empty, 0], weights[empty, 0] = np.clip(nearest, 0, n_frames - 1), 1.0
    return indices, weights


def pool_windows(frames, layer, duration_seconds: float, hop: float, window: float = None,
                 pool: str = "mean") -> np.ndarray:
    """One pooled vector per window of a time grid: (k, C) float32, (k, 2C) for meanmax and
    meanstd, with k = ceil(duration / hop).

    frames: (T, C) array of one feature. layer: its geometry, soundnet.get_layer(name) or a
    FrameGrid (from soundnet.json). duration_seconds: the clip's own duration before tiling
    (the decoded sample count / 22050), hop and window (default: hop) in seconds. Row i pools
    the window [i * hop, i * hop + window), cut at the duration, so frames of a tiled clip past
    its own end are no part of it: mean (and std) weight each frame by the overlap of its cell
    [t_n - hop_n/2, t_n + hop_n/2) with the window; max takes the frames that overlap at all.
    A window no cell overlaps takes the frame whose centre is nearest its centre.
    Raises ValueError for a bad hop, window or pool, or values beyond the float32 range."""
    check_grid(hop, window)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    window = hop if window is None else window
    frames = np.asarray(frames)
    if frames.ndim != 2 or 0 in frames.shape:
        raise ValueError(f"frames must be (frames, channels), both > 0, not {frames.shape}")
    duration = float(duration_seconds)
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number of seconds, not {duration_seconds!r}")
    starts = np.arange(window_count(duration, hop)) * float(hop)
    ends = np.minimum(starts + window, duration)
    # Windows in chunks, so the gathered (windows, frames per window, C) block stays small.
    per_window = (math.ceil(window / layer.hop_seconds) + 3) * frames.shape[1]
    chunk = max(1, POOL_CHUNK_VALUES // per_window)
    vectors = np.concatenate([
        _weighted_pool(frames, *window_weights(starts[i:i + chunk], ends[i:i + chunk],
                                               len(frames), layer), pool)
        for i in range(0, len(starts), chunk)])
    return pooled_to_float32(vectors)


def pooled_to_float32(values: np.ndarray) -> np.ndarray:
    """Pooled (float64) values as float32; ValueError when one does not fit float32 (beyond
    +-3.4e38), naming the largest magnitude."""
    with np.errstate(over="ignore"):
        pooled = values.astype(np.float32)
    if not np.isfinite(pooled).all():
        raise ValueError(f"pooled values beyond the float32 range (largest magnitude "
                         f"{np.abs(values).max():.3g})")
    return pooled


def _weighted_pool(frames: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                   pool: str) -> np.ndarray:
    """Windows of (T, C) frames given by (k, m) indices and weights -> (k, C) or (k, 2C)
    float64: weighted mean, weighted population std, max of the frames of weight > 0."""
    x = frames[indices].astype(np.float64)   # (k, m, C)
    w = weights / weights.sum(axis=1, keepdims=True)
    mean = np.einsum("km,kmc->kc", w, x)
    parts = {"mean": lambda: mean,
             "max": lambda: np.where(weights[..., None] > 0, x, -np.inf).max(axis=1),
             "std": lambda: np.sqrt(np.einsum("km,kmc->kc", w, (x - mean[:, None]) ** 2))}
    return np.concatenate([parts[r]() for r in POOLS[pool]], axis=1)


# ---------------------------------------------------------------------------------------------
# Pickled arrays, read without running code
# ---------------------------------------------------------------------------------------------

class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers; refuses every other callable, so a
    malicious file cannot run code. sound8.npy and the earlier port's feature files are read
    with it."""
    _core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy "
                                         "arrays and plain containers are read")
        module = module.replace("numpy.core", self._core).replace("numpy._core", self._core)
        return getattr(importlib.import_module(module), name)


def read_npy_header(f) -> tuple:
    """(shape, fortran_order, dtype) from the header of the .npy open in f, leaving f at the
    data; ValueError when it is not a .npy file."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):   # 3.0: 2.0 with a UTF-8 header, read the same here
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version[0]}.{version[1]}")


def load_pickled_npy(path):
    """The object that np.save(path, obj) stored as a pickle (see read_pickled_npy)."""
    with open(path, "rb") as f:
        return read_pickled_npy(f)


def read_pickled_npy(f):
    """The object (a dict of arrays, say) in the .npy open in f, from its start, unpickled with
    _ArraysOnlyUnpickler: a payload raises pickle.UnpicklingError naming the callable it asked
    for, and never runs. ValueError when the file is not such an object."""
    shape, _, dtype = read_npy_header(f)
    if dtype != object:
        raise ValueError(f"a plain {dtype} array, not a pickled object")
    value = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        value = value.item()   # np.save(path, a_dict) stores a 0-d object array
    return value
