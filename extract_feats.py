"""Extract SoundNet features from a folder of audio files.

    python extract_feats.py -i ./mp3 -o ./soundnet/raw                      # conv7 y_obj y_scns
    python extract_feats.py -i ./audio -o ./feats -f .mp3 .wav --features pool5 conv7 --topk 5

Writes, for every input, OUT/<feature>/<path relative to -i without extension>.npy, a
(frames, channels) float32 array; OUT/soundnet.json says how to read them (hop, receptive field,
first frame time of each feature) and OUT/manifest.csv has one row per input. Exit status: 0 all
inputs ok, 1 some failed (all others done), 2 usage or configuration error (nothing done), 130 or
143 stopped by Ctrl-C or SIGTERM (after the files already decoded).

Decoding runs in worker processes, started before torch is imported, while the model runs here.
"""
import argparse
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from itertools import chain
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from soundnet_io import (BATCH_SIZE, CHANNEL_POLICIES, CHUNK_SECONDS, DEFAULT_FEATURES,
                         METADATA_FILE, MIN_SECONDS, RESAMPLING_RULE, SAMPLE_RATE, TILING_RULE,
                         AudioError, CsvLog, atomic_write, die_with_parent, ffmpeg_version,
                         locked, open_audio,
                         remove_stale_partials, save_array, tile_clip, write_failure)

MANIFEST = "manifest.csv"
PREDICTIONS = "predictions.csv"
# samples: the decoded count before tiling (exact, where seconds is rounded to ms);
# container_seconds: the duration ffmpeg reports for a file it decoded (a video's picture).
MANIFEST_FIELDS = ["path", "status", "seconds", "sample_rate", "channels", "frames", "error",
                   "input", "samples", "container_seconds"]
PREDICTION_FIELDS = ["path", "head", "rank", "label", "probability"]
HEADS = ("y_obj", "y_scns")   # what --topk ranks
TABLE_FILES = 20     # --topk prints the top labels of at most this many files
QUEUE_BLOCKS = 24    # messages (a decoded block: ~10 s) a worker may run ahead of the model
WAIT_SECONDS = 1.0   # a waiting worker checks this often that the main process lives
POLL_SECONDS = 0.1   # the main process, waiting for a file, checks this often for a stop
REAP_SECONDS = 10.0  # a worker whose pipe closed has this long to exit, for its exit code
CPU_BATCH_SIZE, GPU_BATCH_SIZE = BATCH_SIZE, 64   # files per network call
# Short files wait in a window of up to this many batches (and this much tiled audio for a
# batch of CPU_BATCH_SIZE, in proportion for other sizes: every tiled clip is >= 20 s, so 64
# such clips need 1280 s) so they can be sorted by length: batches then hold files of nearly
# equal length, little padding. A batch of 64 allows 9600 s (850 MB of float32) in the window.
WINDOW_BATCHES = 4
WINDOW_SECONDS = 1200.0
CAN_PIN = hasattr(os, "sched_getaffinity")   # Linux: the cores this job was given
CPUS = len(os.sched_getaffinity(0)) if CAN_PIN else os.cpu_count()
THREAD_INTERVAL_SECONDS = 0.5   # the model's threads are chosen again at most this often


class UsageError(Exception):
    """A configuration problem found before any work: exit 2."""


class OutputFailed(Exception):
    """Writing into OUT failed (full, read-only, ...): the run stops; the message is one line."""


class Interrupted(Exception):
    """A stop was asked for (Ctrl-C, SIGTERM) while a file was read: the run stops after the
    files it has."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", type=Path, default=None,
                   help="sound8.npy weights (default: models/sound8.npy, fetched when missing; "
                        "an installed copy keeps them in $XDG_CACHE_HOME/soundnet/; a path given "
                        "here must exist)")
    p.add_argument("-i", "--input", type=Path, help="folder of audio files, walked recursively")
    p.add_argument("--list", type=Path,
                   help="text file of audio paths, one per line (instead of walking -i; "
                        "output paths are relative to -i if given, else to their common folder)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("-f", "--ext", nargs="+", default=[".mp3"],
                   help="file extensions to take, any case, e.g. -f .mp3 .wav .flac; videos "
                        "and other formats, e.g. -f .mp4 .mkv .webm, need ffmpeg (default: .mp3)")
    p.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES),
                   help="feature names (conv1..conv7, pool1, pool2, pool5, y_obj, y_scns) "
                        f"or Torch module indices 1-26 (default: {' '.join(DEFAULT_FEATURES)})")
    p.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                   help="repeat shorter audio whole, floor(L/n)+1 times for n < L samples, as "
                        f"the earlier port did; 0: no tiling (default: {MIN_SECONDS:g})")
    p.add_argument("--channel", choices=CHANNEL_POLICIES, default="mean",
                   help="downmix: mean of channels, or the first channel as the original Torch "
                        "code (default: mean)")
    p.add_argument("--force", action="store_true",
                   help="redo inputs whose outputs exist; with other settings than OUT was made "
                        "with, first remove its features made with those")
    p.add_argument("--workers", type=int, default=CPUS,
                   help=f"decode processes; 0: decode in the main process (default: {CPUS}, "
                        "the number of cores)")
    p.add_argument("--device", type=device_name, default="auto",
                   metavar="{auto,cpu,cuda,cuda:N,mps}",
                   help="where the model runs; cuda:N: the N-th GPU torch sees; auto: a GPU if "
                        "torch sees one (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="files per network call, of any lengths, grouped by length; files "
                        f"over {CHUNK_SECONDS / 60:g} minutes stream alone (default: "
                        f"{CPU_BATCH_SIZE} on CPU, {GPU_BATCH_SIZE} on a GPU)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="process only the K-th of N deterministic parts of the inputs (1 <= K "
                        "<= N), so N processes can share one output folder")
    p.add_argument("--topk", type=int, default=0,
                   help="also write OUT/predictions.csv with the top K object and scene labels "
                        "(default: 0, none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.input is None and args.list is None:
        p.error("give -i/--input (a folder) or --list (a file of paths)")
    if args.shard:
        k, _, n = args.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            p.error(f"--shard takes K/N with 1 <= K <= N, not {args.shard!r}")
        args.shard = (int(k), int(n))
    batch_size = 1 if args.batch_size is None else args.batch_size
    for flag, value, least in (("--workers", args.workers, 0), ("--topk", args.topk, 0),
                               ("--min-seconds", args.min_seconds, 0),
                               ("--batch-size", batch_size, 1)):
        if not value >= least:   # also refuses nan
            p.error(f"{flag} must be >= {least}, not {value:g}")
    args.ext = sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in args.ext})
    args.argv = list(sys.argv[1:] if argv is None else map(str, argv))   # for soundnet.json
    return args


# -- inputs ------------------------------------------------------------------------------------

def find_inputs(args) -> dict:
    """{output key: (input path, that path relative to the root)}, sorted by key. The key is
    the relative path without its extension, in posix form ("a/x" for a/x.mp3). Raises
    UsageError when the root is missing, holds no matching file, a listed path lies outside it
    (so no output can land outside OUT), or two inputs share a key (x.mp3 and x.wav side by
    side); a file listed twice is taken once. Folders that cannot be read are named in a
    warning on stderr."""
    if args.list:
        paths = read_list(args.list)
        root = args.input or Path(os.path.commonpath([absolute(p).parent for p in paths]))
    else:
        root = args.input
        if root.is_file():
            raise UsageError(f"-i {root}: is a file, not a folder; give its folder "
                             f"(-i {root.parent}) or list files in a text file with --list")
        if not root.is_dir():
            raise UsageError(f"-i {root}: no such folder")
        unreadable = []   # os.walk skips a folder it cannot list, silently unless told
        found = [Path(folder) / name
                 for folder, dirs, files in os.walk(root, onerror=unreadable.append)
                 for name in dirs + files]
        for error in unreadable:
            print(f"warning: cannot read folder {error.filename} ({error.strerror}): "
                  "its files are not taken", file=sys.stderr)
        paths = sorted(path for path in found if path.suffix.lower() in args.ext)
        if not paths:
            raise UsageError(f"no {' or '.join(args.ext)} files under -i {root}; "
                             f"{describe_found(found)}")
    inputs, clashes, taken = {}, [], set()
    for path in paths:
        try:
            relative = absolute(path).relative_to(absolute(root))
        except ValueError:
            raise UsageError(f"{path} is not inside -i {root} (it is {absolute(path)})") from None
        if relative == Path("."):
            raise UsageError(f"{path} is -i itself, not a file inside it")
        if relative in taken:   # listed twice
            continue
        taken.add(relative)
        key = relative.with_suffix("").as_posix()
        if key in inputs:
            clashes.append(f"  {inputs[key][0]} and {path} -> {key}.npy")
        inputs[key] = (path, relative.as_posix())
    if clashes:
        raise UsageError("inputs that would write the same output:\n" + "\n".join(clashes))
    return dict(sorted(inputs.items()))


def read_list(list_file: Path) -> list:
    """The paths in a --list file: one per line, blank lines and "# ..." comments skipped.
    Bytes that are not UTF-8 are kept as the file system's own (surrogateescape), so such names
    open as listed."""
    if not list_file.is_file():
        raise UsageError(f"--list {list_file}: no such file")
    text = list_file.read_bytes().decode("utf-8", errors="surrogateescape")
    paths = [Path(line.strip()) for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    if not paths:
        raise UsageError(f"--list {list_file}: no paths in it")
    return paths


def absolute(path: Path) -> Path:
    """The absolute path with "." and ".." taken out by name, as the output key needs: a
    listed in/../../other/b.mp3 is other/b.mp3, outside -i in, not in/../../other/b."""
    return Path(os.path.abspath(path))


def describe_found(paths: list) -> str:
    """What a folder holds instead, for the message: 'found 10 .mp3, 2 .txt (use -f ...)'."""
    files = [p for p in paths if p.is_file()]
    if not files:
        return "it holds no files"
    counts = Counter(p.suffix.lower() or "(no extension)" for p in files).most_common()
    listed = ", ".join(f"{n} {ext}" for ext, n in counts[:5])
    more = f" and {len(counts) - 5} other kinds" if len(counts) > 5 else ""
    hint = f"; take them with -f {counts[0][0]}" if counts[0][0].startswith(".") else ""
    return f"found {listed}{more}{hint}"


def in_shard(key: str, shard) -> bool:
    """Deterministic split by a hash of the output key: stable when files are added."""
    # The name's bytes: the same as key.encode("utf-8") for UTF-8 names, and defined for names
    # that are not (surrogate-escaped here, where .encode("utf-8") fails).
    return shard is None or zlib.crc32(os.fsencode(key)) % shard[1] == shard[0] - 1


# -- decoding (worker processes: no torch here) ---------------------------------------------------

def decode_worker(tasks, results, channel, parent: int, decoding):
    """Takes one list of (file index, path) from `tasks`, then decodes each in turn into
    `results`, its end of a pipe: ("info", AudioInfo), ("block", samples)..., ("end", None); or
    ("error", message). decoding.value: the index of the file it is on (-1 before the first),
    for the main process to name if this worker dies. A thread sends the messages, so decoding
    runs up to QUEUE_BLOCKS messages ahead of the model. It dies with the main process
    (`parent`): killed with it on Linux, elsewhere by checking each second while it waits."""
    for signum in (signal.SIGINT, signal.SIGTERM):   # the main process decides when to stop
        signal.signal(signum, signal.SIG_IGN)        # (Ctrl-C signals the whole group)
    die_with_parent(parent)

    def exit_if_orphaned():
        if os.getppid() != parent:   # the main process is gone (killed): stop too
            os._exit(1)

    def waiting(wait):
        while True:
            try:
                return wait(timeout=WAIT_SECONDS)
            except (queue.Full, queue.Empty):
                exit_if_orphaned()

    outbox = queue.Queue(QUEUE_BLOCKS)
    sender = threading.Thread(target=send_all, args=(outbox, results), daemon=True)
    sender.start()

    def put(message):
        waiting(lambda timeout: outbox.put(message, timeout=timeout))

    for index, path in waiting(tasks.get):
        decoding.value = index
        try:
            info, blocks = open_audio(path, channel=channel)
            put(("info", info))
            for block in blocks:
                put(("block", block))
            put(("end", None))
        except AudioError as e:
            put(("error", str(e)))
        except Exception as e:   # keep the worker alive for the next file
            put(("error", f"{path}: {type(e).__name__}: {e}"))
    put(None)
    while sender.is_alive():   # the last messages go as the main process reads them
        sender.join(WAIT_SECONDS)
        exit_if_orphaned()


def send_all(outbox, results):
    """Sends the messages of `outbox` into the pipe `results` until None, then closes it."""
    try:
        while (message := outbox.get()) is not None:
            results.send(message)
        results.close()
    except OSError:   # the main process closed its end: it is gone
        os._exit(1)


class Worker(NamedTuple):
    """A decode process, as the main process sees it."""
    process: multiprocessing.Process
    tasks: multiprocessing.Queue       # takes its one list of (file index, path)
    results: Connection                # the reading end of its messages' pipe
    decoding: object                   # a shared int: the index of the file it is on


class Decoders:
    """Decodes files ahead of the model in worker processes, worker w taking files w,
    w + workers, ... so files come back in order without buffering whole files.
    Create it before importing torch (forked workers are then small and start at once); hand
    it the paths with `start` once the work is known."""

    def __init__(self, workers: int, channel: str):
        self.channel, self.paths = channel, []
        self.stopping = lambda: False
        self.died_on = {}   # {file index: message}: files a worker died on, failed in their turn
        # messages of the file being read: received, and resent ones still to drop
        self.received = self.resent = 0
        # fork where the system has it (a forked worker starts at once and shares the parent's
        # pages); spawn elsewhere (Windows), which imports this module afresh: still no torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        self.workers = [self._launch(context) for _ in range(workers)]

    def _launch(self, context) -> Worker:
        tasks = context.Queue()
        tasks.cancel_join_thread()   # exit without waiting to hand its list to a dead worker
        results, its_end = context.Pipe(duplex=False)
        decoding = context.RawValue("q", -1)
        process = context.Process(target=decode_worker, daemon=True, args=(
            tasks, its_end, self.channel, os.getpid(), decoding))
        process.start()
        # The worker now holds the only writing end (later workers are forked without it), so
        # when it dies, reading ends (EOF) even in the middle of a message.
        its_end.close()
        return Worker(process, tasks, results, decoding)

    def start(self, paths: list, stopping=lambda: False):
        """stopping(): whether to stop waiting for a file (raising Interrupted)."""
        self.paths, self.stopping = list(paths), stopping
        for w, worker in enumerate(self.workers):
            worker.tasks.put(self._files_from(w))

    def _files_from(self, first: int) -> list:
        """(index, path) of files first, first + workers, ... (one worker's share), but those a
        worker died on."""
        return [(i, self.paths[i]) for i in range(first, len(self.paths), len(self.workers))
                if i not in self.died_on]

    def file(self, i: int):
        """File i as (AudioInfo, iterator of blocks); raises AudioError, or Interrupted when
        stopping() while it waits. Run the iterator to its end before asking for the next file."""
        if not self.workers:
            return open_audio(self.paths[i], channel=self.channel)
        if i in self.died_on:
            raise AudioError(self.died_on.pop(i))
        self.received = self.resent = 0
        kind, value = self._get(i)
        if kind == "error":
            raise AudioError(value)

        def blocks():
            while True:
                kind, value = self._get(i)
                if kind == "end":
                    return
                if kind == "error":
                    raise AudioError(value)
                yield value
        return value, blocks()

    def _get(self, i: int):
        """The next message of file i; ("error", why) when its worker died on it."""
        while True:
            worker = self.workers[i % len(self.workers)]
            try:
                while not worker.results.poll(POLL_SECONDS):
                    if self.stopping():
                        raise Interrupted
                message = worker.results.recv()
            except (EOFError, OSError):   # the worker died (EOF, before or in a message)
                if self._replace(i):
                    return "error", self.died_on.pop(i)
                self.resent = self.received   # file i comes again from its start
                continue
            if self.resent:   # received from the dead worker already
                self.resent -= 1
                continue
            self.received += 1
            return message

    def _replace(self, i: int) -> bool:
        """The worker of file i died: note the file it was on as failed (a crash in a C
        library, or killed: the OOM killer), and start another for the rest of its files, from
        i on (it may have decoded some that it did not send). Spawned rather than forked, now
        that this process runs torch's threads. Returns whether it died on file i itself."""
        n = len(self.workers)
        dead = self.workers[i % n]
        dead.process.join(REAP_SECONDS)   # its pipe is closed: it is exiting, if not gone
        started, how = dead.decoding.value, exit_reason(dead.process.exitcode)
        on = max(i, started)
        # One that died before its first file fails file i all the same, so that a worker
        # that cannot start is not started again and again.
        self.died_on[on] = f"{self.paths[on]}: " + (
            f"the decoder process died on this file ({how})" if started >= 0
            else f"not decoded: the decoder process died before it ({how})")
        self.workers[i % n] = self._launch(multiprocessing.get_context("spawn"))
        self.workers[i % n].tasks.put(self._files_from(i))
        return on == i

    def close(self):
        for worker in self.workers:
            worker.process.kill()


def exit_reason(exitcode) -> str:
    """'killed by SIGKILL' or 'exit status 1', from Process.exitcode."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit status {exitcode}"


class ModelThreads:
    """Gives the model as many threads as this job's cores (its CPU affinity) had free over
    the last interval: idle ones plus those this process kept busy. Decoders that are ahead
    wait on full queues and leave their cores idle, so the model takes them; decoders at work,
    or other jobs on a shared node, keep theirs (threads beyond the free cores contend with
    them, and OpenMP threads that spin-wait for each other then collapse). Where the system
    has no /proc/stat the model keeps the cores the decoders leave."""

    def __init__(self, torch, threads: int):
        self.torch = torch
        self.cpus = {b"cpu%d" % c for c in os.sched_getaffinity(0)} if CAN_PIN else set()
        torch.set_num_threads(threads)
        self.last = self._sample()

    def update(self):
        """Choose again if THREAD_INTERVAL_SECONDS have passed since the last choice."""
        if self.last is None or time.perf_counter() - self.last[0] < THREAD_INTERVAL_SECONDS:
            return
        now = self._sample()
        (wall, idle, ours), (wall0, idle0, ours0) = now, self.last
        free = ((idle - idle0) / os.sysconf("SC_CLK_TCK") + ours - ours0) / (wall - wall0)
        threads = min(max(1, round(free)), CPUS)
        if threads != self.torch.get_num_threads():
            self.torch.set_num_threads(threads)
        self.last = now

    def _sample(self):
        """(seconds, idle ticks of this job's cores, CPU seconds of this process), or None
        without /proc/stat."""
        try:
            with open("/proc/stat", "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return None
        idle = sum(int(fields[4]) + int(fields[5]) for fields in map(bytes.split, lines)
                   if fields and fields[0] in self.cpus)   # idle + iowait
        return time.perf_counter(), idle, time.process_time()


# -- output files ---------------------------------------------------------------------------------

@contextmanager
def writing_into(out: Path):
    """OSError from writing into OUT -> OutputFailed, one line naming OUT and the reason."""
    try:
        yield
    except OSError as e:
        raise OutputFailed(write_failure(e, out)) from e


class Writer:
    """Runs write jobs in order in one thread, off the model's path: the model computes the
    next batch while the last one's arrays are written and fsynced. The first job to fail
    stops the writing (later jobs are dropped: their files are not recorded, so a re-run does
    them), and its exception is raised in the caller by the next submit and by close."""

    def __init__(self, max_queued: int):
        self.jobs = queue.Queue(max_queued)   # bounded: the arrays waiting use memory
        self.error = None
        self.thread = threading.Thread(target=self._work, name="writer", daemon=True)
        self.thread.start()

    def submit(self, job, *args):
        """Queue job(*args); waits while max_queued jobs wait."""
        if self.error is not None:
            raise self.error
        self.jobs.put((job, args))

    def close(self):
        """Wait until every job submitted has run (or been dropped after a failure)."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _work(self):
        while (item := self.jobs.get()) is not None:
            job, args = item
            if self.error is None:   # after a failure, drain without writing
                try:
                    job(*args)
                except Exception as e:
                    self.error = e


def write_metadata(out: Path, args, layers, sha256: str, feature_names, provenance=None) -> list:
    """OUT/soundnet.json: what a reader needs to interpret the arrays. Arrays made with other
    settings (or found without a soundnet.json) must not stay beside them: the run is refused
    (UsageError naming what differs), or with --force they are removed, with manifest and
    predictions. `provenance` (see run_provenance) is added to the list of the distinct runs
    that wrote into OUT; it is a record for the reader, never compared. Returns the names of
    the features removed. (Why get_avg_pool.py deletes instead: soundnet_io, "Output files".)"""
    settings = {"sample_rate": SAMPLE_RATE, "weights_sha256": sha256,
                "min_seconds": args.min_seconds, "tiling": TILING_RULE, "channel": args.channel}
    path = out / METADATA_FILE
    with locked(out):
        try:
            meta = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except ValueError as e:
            raise UsageError(f"{path}: unreadable ({e}); remove it, or use another -o") from None
        if not isinstance(meta, dict):
            raise UsageError(f"{path}: not what extract_feats.py writes; remove it, or use "
                             "another -o")
        old = {k: meta.get(k) for k in settings}
        folders = [d.name for d in out.iterdir() if d.is_dir() and d.name in feature_names]
        # Names read from the file are only ever feature names ("conv7"): a key "../x" or "/"
        # must not become a folder to remove.
        described = meta.get("features") if isinstance(meta.get("features"), dict) else {}
        described = {name: entry for name, entry in described.items() if name in feature_names}
        if meta:
            stale = sorted(set(described) | set(folders)) if old != settings else []
            why = "made with other settings: " + differences(old, settings)
        else:
            stale = sorted(name for name in folders if any((out / name).rglob("*.npy")))
            why = f"without a {METADATA_FILE} saying how they were made"
        if stale and not args.force:
            raise UsageError(f"{out} holds features ({', '.join(stale)}) {why}; use another -o, "
                             "or --force to remove them and extract with these settings")
        for name in stale:
            shutil.rmtree(out / name, ignore_errors=True)
        if stale:
            for name in (MANIFEST, PREDICTIONS):
                (out / name).unlink(missing_ok=True)
        features = described if meta and not stale else {}
        for layer in layers:
            features[layer.name] = {
                "torch_index": layer.index, "channels": layer.channels,
                "hop_seconds": layer.hop_seconds, "hop_samples": layer.hop,
                "receptive_field_seconds": layer.receptive_field_seconds,
                "receptive_field_samples": layer.receptive_field,
                "first_frame_centre_seconds": layer.first_centre_seconds,
            }
        runs = meta.get("provenance", []) if meta and not stale else []
        runs = runs if isinstance(runs, list) else []
        if provenance and provenance not in runs:
            runs.append(provenance)
        meta = {**settings, "layout": "<feature>/<input path without extension>.npy: "
                "float32 (frames, channels); frame n is centred at first_frame_centre_seconds "
                "+ n * hop_seconds", "features": dict(sorted(features.items())),
                "provenance": runs}
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
    return stale


def run_provenance(args, device: str, net, torch) -> dict:
    """What decides the numbers besides the settings, for a reader who wants to reproduce them:
    versions of this project and its libraries, where and how the model ran, the command."""
    dtype = next(net.parameters()).dtype
    where = f"{device} ({torch.cuda.get_device_name()})" if device == "cuda" else device
    return {"soundnet_pytorch": project_version(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "soundfile": sf.__version__,
            "libsndfile": sf.__libsndfile_version__, "soxr": soxr.__version__,
            "resampling": RESAMPLING_RULE, "ffmpeg": ffmpeg_version(), "device": where,
            "dtype": str(dtype).removeprefix("torch."),
            "command": shlex.join(["extract_feats.py", *args.argv])}


def project_version() -> str:
    """'git <commit>' of the checkout this script is in ('..., with uncommitted changes' when
    tracked files differ from it), else soundnet.__version__."""
    root = Path(__file__).resolve().parent
    if (root / ".git").exists():   # its own checkout, not a repository it was copied into
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=30)
            changes = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=30)
            if commit.returncode == 0:
                return (f"git {commit.stdout.strip()}"
                        + (", with uncommitted changes" if changes.stdout.strip() else ""))
        except (OSError, subprocess.TimeoutExpired):   # git not installed, or hung
            pass
    import soundnet
    return soundnet.__version__


def differences(old: dict, new: dict) -> str:
    """'channel mean (now first), min_seconds 20.0 (now 10.0)': only the keys that differ."""
    def show(value):
        text = "(not recorded)" if value is None else str(value)
        return text[:12] + "..." if len(text) > 40 else text   # a sha256: its start suffices
    return ", ".join(f"{k} {show(old[k])} (now {show(new[k])})" for k in new if old[k] != new[k])


# -- the run --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.output.exists() and not args.output.is_dir():
            raise UsageError(f"-o {args.output}: is a file, not a folder")
        found = {k: v for k, v in find_inputs(args).items() if in_shard(k, args.shard)}
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    decoders = Decoders(min(args.workers, len(found)), args.channel)   # before torch
    try:
        return extract_all(args, found, decoders)
    finally:
        decoders.close()


def extract_all(args, found: dict, decoders: Decoders) -> int:
    """Load the model, claim OUT, then run every file of `found` through a Batcher into a
    Ledger; returns the exit status. found: {output key: (input path, path relative to the
    root)}."""
    import torch
    import soundnet

    inputs = {key: path for key, (path, _) in found.items()}
    try:
        layers = [soundnet.get_layer(name) for name in args.features]
        device = pick_device(args.device, torch)
        if args.model is not None and not args.model.is_file():   # only the default is fetched
            raise UsageError(f"-m {args.model}: no such file (only the default "
                             f"{soundnet.WEIGHTS_PATH} is downloaded when missing)")
        net = soundnet.SoundNet.from_pretrained(args.model or soundnet.WEIGHTS_PATH, device)
    except (ValueError, UsageError, soundnet.WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with writing_into(args.output):
            args.output.mkdir(parents=True, exist_ok=True)
            feature_names = {layer.name for layer in soundnet.LAYERS.values()}
            removed = write_metadata(args.output, args, layers, net.weights_sha256,
                                     feature_names, run_provenance(args, device, net, torch))
            remove_stale_partials(args.output)
            batch_size = args.batch_size or (CPU_BATCH_SIZE if device == "cpu"
                                             else GPU_BATCH_SIZE)
            names = list(dict.fromkeys(layer.name for layer in layers))
            heads = list(HEADS) if args.topk else []
            # a window's files can be handed over while the model runs the next window
            ledger = Ledger(args.output, found, names, heads, args.topk, args.quiet,
                            max_queued=WINDOW_BATCHES * batch_size)
            batcher = Batcher(net, list(dict.fromkeys(names + heads)), names, device,
                              batch_size, args.min_seconds, ledger)
    except (UsageError, OutputFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if removed:
        print(f"removed {', '.join(removed)} from {args.output} (made with other settings)",
              file=sys.stderr)
    todo = [k for k in inputs if args.force or not ledger.done(k)]
    stop = StopRequest()
    decoders.start([inputs[k] for k in todo], stopping=stop.requested)
    interrupted, stopped = False, None
    stop.install()
    try:
        todo_keys = set(todo)
        for key in inputs:
            if stop.requested():   # the rows stay as they were
                break
            if key not in todo_keys:
                ledger.skip(key)
        threads = ModelThreads(torch, max(1, CPUS - len(decoders.workers)))
        for i, key in enumerate(todo):
            if stop.requested():
                break
            info, n_samples = None, 0
            try:
                info, blocks = decoders.file(i)
                blocks = stop.checked(blocks)
                # read whole when short: tiling and batching need the whole file
                first_blocks = []
                for block in blocks:
                    first_blocks.append(block)
                    n_samples += len(block)
                    if n_samples > batcher.stream_above:
                        break
                if n_samples > batcher.stream_above:
                    batcher.stream(key, info, chain(first_blocks, blocks))
                else:
                    batcher.add(key, info, first_blocks)
            except (AudioError, ValueError) as e:
                ledger.fail(key, e, info, n_samples)
            except Interrupted:   # a stop while this file was read: it is left for a re-run
                break
            threads.update()
        batcher.flush()   # also after a stop: the files already decoded
    except KeyboardInterrupt:   # a second Ctrl-C or SIGTERM (or Ctrl-C outside the main thread)
        interrupted = True
    except OutputFailed as e:   # full disk: every later file would fail the same way
        stopped = str(e)
    finally:
        try:
            ledger.close()
        except OutputFailed as e:   # rows stay appended, uncompacted: still readable
            stopped = stopped or str(e)
        finally:
            stop.restore()
    interrupted = interrupted or stop.requested()
    if stopped:
        c = ledger.counts
        print(f"error: {stopped}; stopped after {c['ok']} ok, {c['failed']} failed, "
              f"{c['skipped']} skipped (recorded in {args.output / MANIFEST}); make room and "
              "run again to do the rest", file=sys.stderr)
        return 1
    if args.topk and not interrupted:
        print(predictions_table(args.output / PREDICTIONS, list(inputs)), flush=True)
    print(ledger.summary() + (" (interrupted)" if interrupted else ""), file=sys.stderr)
    if interrupted:
        return 128 + (stop.signal or signal.SIGINT)   # 130 for Ctrl-C, 143 for SIGTERM
    return 1 if ledger.counts["failed"] else 0


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while files are processed, once installed: the first asks
    the run to stop after the files already decoded (`signal` holds its number), a second
    stops it at once (KeyboardInterrupt). `restore` puts the earlier handlers back."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal, self.previous = None, {}

    def install(self):
        if threading.current_thread() is threading.main_thread():   # only there in Python
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self):
        for s, handler in self.previous.items():   # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def requested(self) -> bool:
        return self.signal is not None

    def checked(self, blocks):
        """The blocks of a file, raising Interrupted before the next once a stop is asked for."""
        for block in blocks:
            if self.requested():
                raise Interrupted
            yield block

    def _handle(self, signum, frame):
        if self.requested():
            raise KeyboardInterrupt
        self.signal = signum
        try:   # os.write, not print: this may run in the middle of a print to stderr
            os.write(2, f"\n{signal.Signals(signum).name}: finishing the files already decoded "
                        "(Ctrl-C again stops at once)\n".encode())
        except OSError:
            pass


class Ledger:
    """The outputs of one run in OUT: each file's feature arrays and manifest row, its
    predictions with --topk, the counts and the progress bar. Rows and arrays are written in
    the order they are handed over, by a writer thread (see Writer), off the model's path."""

    def __init__(self, out: Path, found: dict, names: list, heads: list, topk: int,
                 quiet: bool, max_queued: int):
        """found: {output key: (input path, that path relative to the root)}; names: the
        features saved; heads: those ranked for predictions.csv (HEADS with --topk, else none),
        topk ranks each; max_queued: files handed over that may wait for the writer."""
        import soundnet
        self.soundnet, self.out = soundnet, out
        self.names, self.heads, self.topk = names, heads, topk
        self.paths = {key: path for key, (path, _) in found.items()}
        self.sources = {key: relative for key, (_, relative) in found.items()}   # manifest
        self.manifest = CsvLog(out / MANIFEST, MANIFEST_FIELDS, ["path"])
        self.predictions = CsvLog(out / PREDICTIONS, PREDICTION_FIELDS, ["path", "head", "rank"])
        for log in (self.manifest, self.predictions):
            if not log.has_header():   # written by an older version: add the new columns
                log.compact()
        self.previous = self.manifest.rows()
        self.ranked = self.predictions.rows() if heads else {}
        self.failed_keys = set()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.audio_seconds, self.started = 0.0, time.perf_counter()
        self.bar = tqdm(total=len(found), unit="file", disable=quiet or None, dynamic_ncols=True)
        self.writer = Writer(max_queued)

    def done(self, key: str) -> bool:
        """Whether everything this run asks for exists: the arrays, recorded in the manifest
        (arrays without their row were left by a run killed in between: they are made again),
        and with --topk the predictions (its rows, or readable head arrays to rank)."""
        arrays = all((self.out / name / f"{key}.npy").exists() for name in self.names)
        return arrays and self._recorded(key) and (self._ranked(key) or all(
            self._readable_head(key, head) for head in self.heads))

    def _recorded(self, key: str) -> bool:
        """Whether the manifest has key's row of a run that made its arrays. ("skipped": what
        earlier versions wrote on a re-run; those with empty frames followed a kill.)"""
        row = self.previous.get((key,))
        return row is not None and row["status"] in ("ok", "skipped") and bool(row["frames"])

    def _readable_head(self, key: str, head: str) -> bool:
        """Whether OUT/<head>/<key>.npy holds logits to rank; says so when it is there but
        unreadable (the file is then extracted again)."""
        path = self.out / head / f"{key}.npy"
        if not path.exists():
            return False
        try:   # the header checked against the file's size, without reading the data
            logits = np.load(path, mmap_mode="r", allow_pickle=False)
            channels = self.soundnet.get_layer(head).channels
            if logits.ndim != 2 or not len(logits) or logits.shape[1] != channels:
                raise ValueError(f"shape {logits.shape}, not (frames >= 1, {channels})")
        except (ValueError, OSError, EOFError) as e:
            tqdm.write(f"{path}: unreadable ({e}); extracting {self.sources[key]} again",
                       file=sys.stderr)
            return False
        return True

    def _ranked(self, key: str) -> bool:
        """Whether predictions.csv has ranks 1..K of both heads for key."""
        return all((key, head, str(rank)) in self.ranked for head in self.heads
                   for rank in range(1, min(self.topk,
                                            self.soundnet.get_layer(head).channels) + 1))

    def save(self, key, info, n_samples, feats):
        """Hand a file's arrays and row to the writer thread (feats: {name: (frames, C)})."""
        row = {"path": key, "status": "ok", "seconds": f"{n_samples / SAMPLE_RATE:.3f}",
               "sample_rate": info.sample_rate, "channels": info.channels,
               "frames": " ".join(f"{n}:{len(feats[n])}" for n in self.names),
               **durations(info, n_samples)}
        self.writer.submit(self._write, key, feats, row)

    def _write(self, key, feats, row):
        """In the writer thread: the arrays (each fsynced and renamed into place), then the
        row, so a file recorded in the manifest is complete on disk."""
        with writing_into(self.out):
            for name in self.names:
                save_array(self.out / name / f"{key}.npy", feats[name])
        self._record(row, feats)

    def fail(self, key, error, info=None, n_samples=0):
        """Record that key's file failed: `error` (a message or an exception) said on stderr
        and in its row, which names the input path."""
        path = self.paths[key]
        message = str(error) if str(error).startswith(str(path)) else f"{path}: {error}"
        row = {"path": key, "status": "failed", "error": message}
        if info is not None:
            row.update(seconds=f"{n_samples / SAMPLE_RATE:.3f}", sample_rate=info.sample_rate,
                       channels=info.channels, **durations(info, n_samples))
        tqdm.write(f"failed: {message}", file=sys.stderr)
        self.failed_keys.add(key)
        self._finish(row)

    def skip(self, key):
        """Outputs already there (see done): the manifest keeps the row of the run that made
        them, `ok` (this run's skips are counted in the summary); predictions missing from
        predictions.csv are ranked from the saved head arrays."""
        heads = None
        if self.heads and not self._ranked(key):
            heads = {h: np.load(self.out / h / f"{key}.npy", allow_pickle=False)
                     for h in self.heads}
        self._finish({**self.previous[(key,)], "status": "ok"}, heads, counted="skipped")

    def _finish(self, row: dict, heads=None, counted=None):
        """Record a row (and rank the heads for --topk) after the files handed over before.
        counted: what this run did with the file, for the summary (default: its status)."""
        self.writer.submit(self._record, row, heads, counted)

    def _record(self, row: dict, heads=None, counted=None):
        """In the writer thread: the manifest row, predictions, counts and progress bar."""
        counted = counted or row["status"]
        row["input"] = self.sources[row["path"]]
        with writing_into(self.out):
            self.manifest.append([row])
            if self.heads and heads:
                self.predictions.append(
                    {"path": row["path"], "head": h, "rank": rank, "label": label,
                     "probability": f"{p:.6f}"}
                    for h in self.heads
                    for rank, (label, p) in enumerate(
                        self.soundnet.top_labels(heads[h], h, self.topk), 1))
        self.counts[counted] += 1
        if counted != "skipped":
            self.audio_seconds += float(row.get("seconds") or 0)
        self.bar.update()
        self.bar.set_postfix_str(f"{self.audio_seconds / self.elapsed():.0f}x realtime",
                                 refresh=False)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def close(self):
        """Write what is handed over, then compact the logs; predictions.csv keeps exactly
        ranks 1..K of the files not failed. Raises OutputFailed when a write failed."""
        try:
            self.writer.close()
        finally:
            self.bar.close()
        with writing_into(self.out):
            self.manifest.compact()
            if self.heads:
                self.predictions.compact(lambda row: int(row["rank"]) <= self.topk
                                         and row["path"] not in self.failed_keys)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped; "
                f"{self.audio_seconds / 3600:.2f} h of audio in {self.elapsed():.1f} s "
                f"({self.audio_seconds / self.elapsed():.0f}x realtime)")


class Batcher:
    """Runs the files through the model: one longer than soundnet.CHUNK_SECONDS streams alone
    in chunks; shorter ones are tiled to min_seconds and wait in a window of up to
    WINDOW_BATCHES batches, then run in batches of similar length (SoundNet.extract_many).
    Out of memory, batches are halved for the rest of the run. Each file's features, or why
    it failed, go to the ledger."""

    def __init__(self, net, computed: list, names: list, device: str, batch_size: int,
                 min_seconds: float, ledger: Ledger):
        """computed: the features the model gives (names, saved, and the heads ranked);
        batch_size: files per network call to start with."""
        import soundnet
        import torch
        self.soundnet, self.torch, self.net, self.device = soundnet, torch, net, device
        self.computed, self.names = computed, names
        self.min_seconds, self.ledger = min_seconds, ledger
        self.longest_minimum = max(map(soundnet.get_layer, computed),
                                   key=lambda layer: layer.min_samples)
        self.stream_above = int(soundnet.CHUNK_SECONDS * SAMPLE_RATE)  # longer: streamed
        self.use_batch_size(batch_size)
        self.window = []   # [(key, info, n_samples, tiled wave)] waiting for a batch
        self.window_samples = 0   # of the tiled waves in it
        self.window_limit = WINDOW_SECONDS * batch_size / CPU_BATCH_SIZE * SAMPLE_RATE

    def use_batch_size(self, files: int):
        self.batch_size = files
        # padded audio per network call, in proportion to the batch size (memory)
        self.batch_seconds = self.soundnet.BATCH_SECONDS * files / self.soundnet.BATCH_SIZE

    def stream(self, key, info, blocks):
        """A long file, through the model in chunks."""
        n_samples = 0

        def counted():
            nonlocal n_samples
            for block in blocks:
                n_samples += len(block)
                yield block
        try:
            feats = self.net.extract_stream(counted(), self.computed)
        except self.torch.cuda.OutOfMemoryError as e:
            reason = self._out_of_memory(e, "in chunks")
        else:
            return self.ledger.save(key, info, n_samples, feats)
        self.torch.cuda.empty_cache()
        for _ in counted():   # the rest of the file, so the next file's blocks come next
            pass
        self.ledger.fail(key, reason, info, n_samples)

    def add(self, key, info, blocks: list):
        """A short file, whole: tiled to min_seconds, then run in a batch with files of
        similar length (any lengths batch exactly: SoundNet.extract_many)."""
        # one block (a clip up to ~10 s, or an MP3 read whole) needs no copy
        wave = blocks[0] if len(blocks) == 1 else np.concatenate([np.zeros(0, np.float32),
                                                                  *blocks])
        n_samples = len(wave)
        if n_samples == 0:
            raise AudioError("no samples (decodes to 0 samples)")
        wave = tile_clip(wave, self.min_seconds)
        if len(wave) < self.longest_minimum.min_samples:   # fail it here, not its batch
            raise ValueError(self.too_short(len(wave)))
        self.window.append((key, info, n_samples, wave))
        self.window_samples += len(wave)
        if (len(self.window) >= WINDOW_BATCHES * self.batch_size
                or self.window_samples >= self.window_limit):
            self.flush()

    def too_short(self, n_samples: int) -> str:
        """Why a (tiled) clip of n_samples cannot give every feature asked for, naming those
        that need more and how to drop them or tile to their length."""
        short = [name for name in self.computed
                 if self.soundnet.get_layer(name).min_samples > n_samples]
        others = [name for name in self.names if name not in short]
        fixes = []
        if others and len(others) < len(self.names):   # some features asked for can be had
            fixes.append(f"take the others alone (--features {' '.join(others)})")
        if any(name not in self.names for name in short):   # heads computed only to rank
            fixes.append("drop --topk")
        need = self.longest_minimum.min_samples / SAMPLE_RATE
        fixes.append(f"tile short clips to at least {need:.2f} s (--min-seconds "
                     f"{math.ceil(need)})")
        return (f"{self.soundnet.too_short_message(self.longest_minimum, n_samples)}; too "
                f"short for {', '.join(short)}: {', or '.join(fixes)}")

    def flush(self):
        """Run the files waiting in the window (extract_many sorts them by length)."""
        window, self.window, self.window_samples = self.window, [], 0
        if window:
            feats = self._extract_batched([wave for *_, wave in window])
            for (key, info, n_samples, _), f in zip(window, feats):
                if isinstance(f, str):
                    self.ledger.fail(key, f, info, n_samples)
                else:
                    self.ledger.save(key, info, n_samples, f)

    def _extract_batched(self, waves: list) -> list:
        """extract_many of the waves; out of memory, again in batches half as large (kept
        for the rest of the run), then one at a time. Returns their features, or for a wave
        that does not fit even alone the reason, a string."""
        while self.batch_size > 1:
            try:
                return self.net.extract_many(waves, self.computed, batch_size=self.batch_size,
                                             batch_seconds=self.batch_seconds)
            except self.torch.cuda.OutOfMemoryError:
                pass
            self.torch.cuda.empty_cache()   # the error (and the tensors it held) is gone here
            self.use_batch_size(self.batch_size // 2)
            tqdm.write(f"out of memory on {self.device}: batches of {self.batch_size} files "
                       "from now on", file=sys.stderr)
        results = []
        for wave in waves:   # one at a time: only those that do not fit alone fail
            try:
                results += self.net.extract_many([wave], self.computed, batch_size=1)
            except self.torch.cuda.OutOfMemoryError as e:
                results.append(self._out_of_memory(e, "alone"))
            self.torch.cuda.empty_cache()
        return results

    def _out_of_memory(self, error, how: str) -> str:
        """Why a file failed: it does not fit in the device's memory even `how`."""
        said = (str(error).strip().splitlines() or [""])[0][:200]
        return f"out of memory on {self.device} even {how}" + (f" ({said})" if said else "")


def durations(info, n_samples: int) -> dict:
    """The manifest's exact sample count and, for a file ffmpeg decoded, its container's
    duration ("" when unknown)."""
    container = info.container_seconds
    return {"samples": n_samples, "container_seconds": "" if container is None else f"{container:.3f}"}


def predictions_table(path: Path, keys: list, max_files: int = TABLE_FILES) -> str:
    """predictions.csv made readable on a terminal: the top scenes and objects of the first
    max_files of `keys` that have predictions, two aligned lines per file; further files are
    counted, not printed, so a folder of thousands of files still gives a short table."""
    log = CsvLog(path, PREDICTION_FIELDS, ["path", "head", "rank"])
    rows = sorted(log.rows().values(), key=lambda row: int(row["rank"]))
    top = {}   # (key, head) -> ["label 12.3%", ...] in rank order
    for row in rows:
        top.setdefault((row["path"], row["head"]), []).append(
            f"{short_label(row['label'])} {float(row['probability']):.1%}")
    keys = [key for key in keys if (key, "y_scns") in top]
    if not keys:
        return f"no predictions in {path}"
    shown = keys[:max_files]
    names = {key: printable(key) for key in shown}
    key_width = max(map(len, names.values()))
    cell_width = 2 + max(len(cell) for key in shown for head in ("y_scns", "y_obj")
                         for cell in top.get((key, head), []))
    lines = ["top scenes (Places2) and objects (ImageNet), softmax probability averaged over "
             "each clip's frames:"]
    for key in shown:
        for name, head, title in ((names[key], "y_scns", "scenes "), ("", "y_obj", "objects")):
            cells = "".join(cell.ljust(cell_width) for cell in top.get((key, head), []))
            lines.append(f"  {name:<{key_width}}  {title}  {cells}".rstrip())
    if len(keys) > len(shown):
        lines.append(f"  ... and {len(keys) - len(shown)} more in {path}")
    return "\n".join(lines)


def printable(name: str) -> str:
    """A file name for one line of a terminal: line breaks, other control characters and bytes
    that are not UTF-8 written as Python escapes ('a\\nb', 'x\\udcff')."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in name)


def short_label(label: str) -> str:
    """A label of predictions.csv in the one readable form (soundnet.readable_label), also
    for rows that earlier versions wrote raw ('/s/stadium/football', 'seashore, coast')."""
    import soundnet   # already imported by the run that wrote the table
    return soundnet.readable_label(label)


def device_name(text: str) -> str:
    """--device's type: auto, cpu, cuda, cuda:N, mps or mps:0 (checked against the machine by
    pick_device, once torch is imported)."""
    if re.fullmatch(r"auto|cpu|(cuda|mps)(:[0-9]+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give auto, cpu, cuda, cuda:N or mps")


def pick_device(name: str, torch) -> str:
    """The torch device the model runs on; UsageError saying why `name` cannot be used."""
    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if mps and mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"--device {name}: this torch ({torch.__version__}) is built without "
                             "CUDA; install a CUDA build (see pytorch.org), or use --device cpu")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
            raise UsageError(f"--device {name}: no GPU visible (torch built with CUDA "
                             f"{torch.version.cuda}{shown}); check nvidia-smi and the driver, "
                             "or use --device cpu")
        if index and int(index) >= count:
            raise UsageError(f"--device {name}: torch sees {count} GPU"
                             f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    elif kind == "mps":
        if mps is None or not mps.is_built():
            raise UsageError(f"--device {name}: this torch ({torch.__version__}) is built without "
                             "MPS (Apple-silicon Macs only); use --device cpu")
        if not mps.is_available():
            raise UsageError(f"--device {name}: torch sees no Apple GPU (MPS needs Apple silicon "
                             "and macOS 12.3 or later); use --device cpu")
        if index and int(index) > 0:
            raise UsageError(f"--device {name}: there is one Apple GPU, mps (mps:0)")
    if kind != "cpu":
        try:   # the first use starts the device: a driver or GPU fault shows here
            torch.zeros(1, device=name).cpu()
        except RuntimeError as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--device {name}: the GPU failed to start ({reason})") from None
    return name


if __name__ == "__main__":
    sys.exit(main())
