"""Extract SoundNet features from a folder of audio files.

    python extract_feats.py -i ./mp3 -o ./soundnet/raw                      # conv7 y_obj y_scns
    python extract_feats.py -i ./audio -o ./feats -f .mp3 .wav --features pool5 conv7 --topk 5

Writes, for every input, OUT/<feature>/<path relative to -i without extension>.npy, a
(frames, channels) float32 array; OUT/soundnet.json says how to read them (hop, receptive field,
first frame time of each feature) and OUT/manifest.csv has one row per input. Exit status: 0 all
inputs ok, 1 some failed (all others done), 2 usage or configuration error (nothing done).

Decoding runs in worker processes, started before torch is imported, while the model runs here.
"""
import argparse
import csv
import io
import json
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import time
import uuid
import zlib
from collections import Counter
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from soundnet_io import (CHANNEL_POLICIES, METADATA_FILE, MIN_SECONDS, SAMPLE_RATE, TILING_RULE,
                         AudioError, atomic_write, open_audio, process_alive,
                         remove_stale_partials, save_array, tile_clip, write_failure)

MANIFEST = "manifest.csv"
PREDICTIONS = "predictions.csv"
MANIFEST_FIELDS = ["path", "status", "seconds", "sample_rate", "channels", "frames", "error",
                   "input"]
PREDICTION_FIELDS = ["path", "head", "rank", "label", "probability"]
HEADS = ("y_obj", "y_scns")   # what --topk ranks
TABLE_FILES = 20     # --topk prints the top labels of at most this many files
QUEUE_BLOCKS = 24    # decoded ~10 s blocks a worker may run ahead of the model
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 64   # files per network call (soundnet.BATCH_SIZE)
# Short files wait in a window of up to this many batches (and this much tiled audio) so they
# can be sorted by length: batches then hold files of nearly equal length, little padding.
WINDOW_BATCHES = 4
WINDOW_SECONDS = 1200.0
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
LOCK_FILE = ".soundnet.lock"
# Without fcntl (Windows) the lock is a file created exclusively. Holders keep it for
# milliseconds, so one this old was left by a process that died (on any machine).
STALE_LOCK_SECONDS = 600.0


class UsageError(Exception):
    """A configuration problem found before any work: exit 2."""


class OutputFailed(Exception):
    """Writing into OUT failed (full, read-only, ...): the run stops; the message is one line."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", type=Path, default=None,
                   help="sound8.npy weights (default: models/sound8.npy, fetched when missing; "
                        "a path given here must exist)")
    p.add_argument("-i", "--input", type=Path, help="folder of audio files, walked recursively")
    p.add_argument("--list", type=Path,
                   help="text file of audio paths, one per line (instead of walking -i; "
                        "output paths are relative to -i if given, else to their common folder)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("-f", "--ext", nargs="+", default=[".mp3"],
                   help="file extensions to take, any case, e.g. -f .mp3 .wav .flac; videos "
                        "and other formats, e.g. -f .mp4 .mkv .webm, need ffmpeg (default: .mp3)")
    p.add_argument("--features", nargs="+", default=["conv7", "y_obj", "y_scns"],
                   help="feature names (conv1..conv7, pool1, pool2, pool5, y_obj, y_scns) "
                        "or Torch module indices 1-26 (default: conv7 y_obj y_scns)")
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
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where the model runs; auto: a GPU if torch sees one (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="files per network call, of any lengths, grouped by length; files "
                        "over 4 minutes stream alone (default: "
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
    return args


# -- inputs ------------------------------------------------------------------------------------

def find_inputs(args) -> dict:
    """{output key: (input path, that path relative to the root)}, sorted by key. The key is
    the relative path without its extension, in posix form ("a/x" for a/x.mp3). Raises
    UsageError when the root is missing, holds no matching file, or two inputs share a key
    (x.mp3 and x.wav side by side)."""
    if args.list:
        if not args.list.is_file():
            raise UsageError(f"--list {args.list}: no such file")
        lines = args.list.read_text(encoding="utf-8").splitlines()
        paths = [Path(line.strip()) for line in lines if line.strip() and not line.startswith("#")]
        if not paths:
            raise UsageError(f"--list {args.list}: no paths in it")
        root = args.input or Path(os.path.commonpath([p.absolute().parent for p in paths]))
    else:
        root = args.input
        if root.is_file():
            raise UsageError(f"-i {root}: is a file, not a folder; give its folder "
                             f"(-i {root.parent}) or list files in a text file with --list")
        if not root.is_dir():
            raise UsageError(f"-i {root}: no such folder")
        found = [Path(folder) / name for folder, dirs, files in os.walk(root)
                 for name in dirs + files]
        paths = sorted(path for path in found if path.suffix.lower() in args.ext)
        if not paths:
            raise UsageError(f"no {' or '.join(args.ext)} files under -i {root}; "
                             f"{describe_found(found)}")
    inputs, clashes = {}, []
    for path in paths:
        try:
            relative = path.absolute().relative_to(root.absolute())
        except ValueError:
            raise UsageError(f"{path} is not inside -i {root}") from None
        key = relative.with_suffix("").as_posix()
        if key in inputs:
            clashes.append(f"  {inputs[key][0]} and {path} -> {key}.npy")
        inputs[key] = (path, relative.as_posix())
    if clashes:
        raise UsageError("inputs that would write the same output:\n" + "\n".join(clashes))
    return dict(sorted(inputs.items()))


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
    return shard is None or zlib.crc32(key.encode("utf-8")) % shard[1] == shard[0] - 1


# -- decoding (worker processes: no torch here) ---------------------------------------------------

def decode_worker(tasks, results, channel):
    """Takes one list of paths from `tasks`, then decodes each in turn into `results`:
    ("info", AudioInfo), ("block", samples)..., ("end", None); or ("error", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
    parent = os.getppid()

    def waiting(wait):   # while it waits, check each second that the main process is alive
        while True:
            try:
                return wait(timeout=1.0)
            except (queue.Full, queue.Empty):
                if os.getppid() != parent:   # the main process is gone (killed): stop too
                    os._exit(1)

    def put(message):
        waiting(lambda timeout: results.put(message, timeout=timeout))

    for path in waiting(tasks.get):
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


class Decoders:
    """Decodes files ahead of the model in worker processes, worker w taking files w,
    w + workers, ... so files come back in order without buffering whole files.
    Create it before importing torch (forked workers are then small and start at once); hand
    it the paths with `start` once the work is known."""

    def __init__(self, workers: int, channel: str):
        self.channel, self.paths, self.ahead = channel, [], False
        # fork where the system has it (a forked worker starts at once and shares the parent's
        # pages); spawn elsewhere (Windows), which imports this module afresh: still no torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        self.workers = [self._launch(context) for _ in range(workers)]

    def _launch(self, context):
        tasks, results = context.Queue(), context.Queue(QUEUE_BLOCKS)
        process = context.Process(target=decode_worker, args=(tasks, results, self.channel),
                                  daemon=True)
        process.start()
        return process, tasks, results

    def start(self, paths: list):
        self.paths = list(paths)
        for w, (_, tasks, _) in enumerate(self.workers):
            tasks.put(self.paths[w::len(self.workers)])

    def threads_for_model(self, i: int) -> int:
        """Cores for the model once file i has been received: all of them while the decoders
        are ahead (file i was waiting: they block on full queues, as on short clips, where the
        model does most of the work), else those the decoders leave free (long files, where
        decoding does)."""
        return CPUS if self.ahead else max(1, CPUS - self.busy(i))

    def busy(self, i: int) -> int:
        """How many workers still decode once file i has been received."""
        return sum(1 for w in range(len(self.workers)) if i + 1 + w < len(self.paths))

    def file(self, i: int):
        """File i as (AudioInfo, iterator of blocks); raises AudioError. Run the iterator to
        its end before asking for the next file."""
        if not self.workers:
            return open_audio(self.paths[i], channel=self.channel)
        self.ahead = not self.workers[i % len(self.workers)][2].empty()
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
        n = len(self.workers)
        process, _, results = self.workers[i % n]
        while True:
            try:
                return results.get(timeout=1.0)
            except queue.Empty:
                if process.is_alive():
                    continue
            # The decoder died on this file (a crash in a C library, or killed): report it and
            # go on with that worker's next files in a new process, spawned rather than forked
            # now that this process runs torch's threads.
            self.workers[i % n] = self._launch(multiprocessing.get_context("spawn"))
            self.workers[i % n][1].put(self.paths[i + n::n])
            return "error", (f"{self.paths[i]}: the decoder crashed on this file "
                             f"(exit code {process.exitcode})")

    def close(self):
        for process, _, _ in self.workers:
            process.kill()


# -- output files ---------------------------------------------------------------------------------

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


@contextmanager
def writing_into(out: Path):
    """OSError from writing into OUT -> OutputFailed, one line naming OUT and the reason."""
    try:
        yield
    except OSError as e:
        raise OutputFailed(write_failure(e, out)) from e


class CsvLog:
    """A CSV written as you go (rows appended under the lock, so an interrupted run keeps what
    it did) and compacted at the end of a run: the last row per key, sorted, atomically."""

    def __init__(self, path: Path, fields, key_fields):
        self.path, self.fields, self.key_fields = path, fields, key_fields

    def append(self, rows):
        """Whole rows or nothing: a write that fails (full disk) is cut back off the file."""
        text = io.StringIO()
        csv.DictWriter(text, self.fields).writerows(rows)
        with locked(self.path.parent), open(self.path, "ab", buffering=0) as f:
            start = f.seek(0, os.SEEK_END)
            header = "" if start else ",".join(self.fields) + "\r\n"
            try:
                write_all(f, (header + text.getvalue()).encode("utf-8", "surrogateescape"))
            except OSError:
                f.truncate(start)
                raise

    def rows(self) -> dict:
        """{key: last row for it}."""
        if not self.path.exists():
            return {}
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return {tuple(r[k] for k in self.key_fields): r for r in csv.DictReader(f)}

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
                writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(row for _, row in sorted(rows.items()) if keep(row))


def write_all(f, data: bytes):
    """Write all of `data` to the unbuffered binary file f (a raw write may write less)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def write_metadata(out: Path, args, layers, sha256: str, feature_names) -> list:
    """OUT/soundnet.json: what a reader needs to interpret the arrays. Arrays made with other
    settings (or found without a soundnet.json) must not stay beside them: the run is refused
    (UsageError naming what differs), or with --force they are removed, with manifest and
    predictions. Returns the names of the features removed."""
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
        if meta:
            stale = sorted(set(meta.get("features", {})) | set(folders)) if old != settings else []
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
        features = meta.get("features", {}) if meta and not stale else {}
        for layer in layers:
            features[layer.name] = {
                "torch_index": layer.index, "channels": layer.channels,
                "hop_seconds": layer.hop_seconds, "hop_samples": layer.hop,
                "receptive_field_seconds": layer.receptive_field_seconds,
                "receptive_field_samples": layer.receptive_field,
                "first_frame_centre_seconds": layer.first_centre_seconds,
            }
        meta = {**settings, "layout": "<feature>/<input path without extension>.npy: "
                "float32 (frames, channels); frame n is centred at first_frame_centre_seconds "
                "+ n * hop_seconds", "features": dict(sorted(features.items()))}
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
    return stale


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
        return run(args, found, decoders)
    finally:
        decoders.close()


def run(args, found: dict, decoders: Decoders) -> int:
    """found: {output key: (input path, path relative to the root)}."""
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
            names = {layer.name for layer in soundnet.LAYERS.values()}
            removed = write_metadata(args.output, args, layers, net.weights_sha256, names)
            remove_stale_partials(args.output)
            job = Extraction(args, net, layers, device,
                             {key: relative for key, (_, relative) in found.items()})
    except (UsageError, OutputFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if removed:
        print(f"removed {', '.join(removed)} from {args.output} (made with other settings)",
              file=sys.stderr)
    todo = [k for k in inputs if args.force or not job.done(k)]
    decoders.start([inputs[k] for k in todo])
    todo_keys = set(todo)
    for key in inputs:
        if key not in todo_keys:
            job.skip(key)
    torch.set_num_threads(max(1, CPUS - len(decoders.workers)))
    interrupted, stopped = False, None
    try:
        for i, key in enumerate(todo):
            info, n_samples = None, 0
            try:
                info, blocks = decoders.file(i)
                head = []   # read whole when short: tiling and batching need the whole file
                for block in blocks:
                    head.append(block)
                    n_samples += len(block)
                    if n_samples > job.stream_above:
                        break
                if n_samples > job.stream_above:
                    job.stream(key, info, chain(head, blocks))
                else:
                    job.add(key, info, head)
            except (AudioError, ValueError) as e:
                job.fail(key, inputs[key], e, info, n_samples)
            threads = decoders.threads_for_model(i)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        job.flush()
    except KeyboardInterrupt:
        interrupted = True
    except OutputFailed as e:   # full disk: every later file would fail the same way
        stopped = str(e)
    finally:
        try:
            job.close()
        except OutputFailed as e:   # rows stay appended, uncompacted: still readable
            stopped = stopped or str(e)
    if stopped:
        c = job.counts
        print(f"error: {stopped}; stopped after {c['ok']} ok, {c['failed']} failed, "
              f"{c['skipped']} skipped (recorded in {args.output / MANIFEST}); make room and "
              "run again to do the rest", file=sys.stderr)
        return 1
    if args.topk and not interrupted:
        print(predictions_table(args.output / PREDICTIONS, list(inputs)), flush=True)
    print(job.summary() + (" (interrupted)" if interrupted else ""), file=sys.stderr)
    if interrupted:
        return 130
    return 1 if job.counts["failed"] else 0


class Extraction:
    """The outputs of one run: feature arrays, manifest and predictions rows, counts, the
    progress bar; and the batching of short files."""

    def __init__(self, args, net, layers, device: str, sources: dict):
        """sources: {output key: input path relative to the root}, for the manifest."""
        import soundnet
        self.soundnet, self.args, self.net, self.out = soundnet, args, net, args.output
        self.sources = sources
        self.names = list(dict.fromkeys(layer.name for layer in layers))
        self.heads = list(HEADS) if args.topk else []
        self.computed = list(dict.fromkeys(self.names + self.heads))
        self.longest_minimum = max(map(soundnet.get_layer, self.computed),
                                   key=lambda layer: layer.min_samples)
        self.stream_above = int(soundnet.CHUNK_SECONDS * SAMPLE_RATE)  # longer: streamed
        self.batch_size = args.batch_size or (CPU_BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE)
        # padded audio per network call, in proportion to the batch size (memory)
        self.batch_seconds = soundnet.BATCH_SECONDS * self.batch_size / soundnet.BATCH_SIZE
        self.window = []   # [(key, info, n_samples, tiled wave)] waiting for a batch
        self.manifest = CsvLog(self.out / MANIFEST, MANIFEST_FIELDS, ["path"])
        self.predictions = CsvLog(self.out / PREDICTIONS, PREDICTION_FIELDS,
                                  ["path", "head", "rank"])
        for log in (self.manifest, self.predictions):
            if not log.has_header():   # written by an older version: add the new columns
                log.compact()
        self.previous = self.manifest.rows()
        self.ranked = self.predictions.rows() if self.heads else {}
        self.failed_keys = set()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.audio_seconds, self.started = 0.0, time.perf_counter()
        self.bar = tqdm(total=len(sources), unit="file", disable=args.quiet or None,
                        dynamic_ncols=True)

    def done(self, key: str) -> bool:
        """Whether everything this run asks for exists: the arrays, and with --topk the
        predictions (its rows, or the head arrays to rank)."""
        arrays = all((self.out / name / f"{key}.npy").exists() for name in self.names)
        return arrays and (self._ranked(key) or all(
            (self.out / head / f"{key}.npy").exists() for head in self.heads))

    def _ranked(self, key: str) -> bool:
        """Whether predictions.csv has ranks 1..K of both heads for key."""
        return all((key, head, str(rank)) in self.ranked for head in self.heads
                   for rank in range(1, min(self.args.topk,
                                            self.soundnet.get_layer(head).channels) + 1))

    # -- one file ---------------------------------------------------------------------------------

    def stream(self, key, info, blocks):
        """A long file, through the model in chunks."""
        n_samples = 0

        def counted():
            nonlocal n_samples
            for block in blocks:
                n_samples += len(block)
                yield block
        feats = self.net.extract_stream(counted(), self.computed)
        self.save(key, info, n_samples, feats)

    def add(self, key, info, blocks: list):
        """A short file, whole: tiled to --min-seconds, then run in a batch with files of
        similar length (any lengths batch exactly: SoundNet.extract_many)."""
        wave = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        n_samples = len(wave)
        if n_samples == 0:
            raise AudioError("no samples (decodes to 0 samples)")
        wave = tile_clip(wave, self.args.min_seconds)
        if len(wave) < self.longest_minimum.min_samples:   # fail it here, not its batch
            raise ValueError(self.soundnet.too_short_message(self.longest_minimum, len(wave)))
        self.window.append((key, info, n_samples, wave))
        if (len(self.window) >= WINDOW_BATCHES * self.batch_size
                or sum(len(w) for *_, w in self.window) >= WINDOW_SECONDS * SAMPLE_RATE):
            self.flush()

    def flush(self):
        """Run the files waiting in the window (extract_many sorts them by length)."""
        window, self.window = self.window, []
        if window:
            feats = self.net.extract_many([wave for *_, wave in window], self.computed,
                                          batch_size=self.batch_size,
                                          batch_seconds=self.batch_seconds)
            for (key, info, n_samples, _), f in zip(window, feats):
                self.save(key, info, n_samples, f)

    # -- rows ---------------------------------------------------------------------------------------

    def save(self, key, info, n_samples, feats):
        with writing_into(self.out):
            for name in self.names:
                save_array(self.out / name / f"{key}.npy", feats[name])
        self._finish({"path": key, "status": "ok", "seconds": f"{n_samples / SAMPLE_RATE:.3f}",
                      "sample_rate": info.sample_rate, "channels": info.channels,
                      "frames": " ".join(f"{n}:{len(feats[n])}" for n in self.names)}, feats)

    def fail(self, key, path, error, info=None, n_samples=0):
        message = str(error) if str(error).startswith(str(path)) else f"{path}: {error}"
        row = {"path": key, "status": "failed", "error": message}
        if info is not None:
            row.update(seconds=f"{n_samples / SAMPLE_RATE:.3f}", sample_rate=info.sample_rate,
                       channels=info.channels)
        tqdm.write(f"failed: {message}", file=sys.stderr)
        self.failed_keys.add(key)
        self._finish(row)

    def skip(self, key):
        """Outputs already there: the manifest keeps what the earlier run recorded; predictions
        missing from predictions.csv are ranked from the saved head arrays."""
        heads = None
        if self.heads and not self._ranked(key):
            heads = {h: np.load(self.out / h / f"{key}.npy", allow_pickle=False)
                     for h in self.heads}
        self._finish({**self.previous.get((key,), {"path": key}), "status": "skipped",
                      "error": ""}, heads)

    def _finish(self, row: dict, heads=None):
        row["input"] = self.sources[row["path"]]
        with writing_into(self.out):
            self.manifest.append([row])
            if self.heads and heads:
                self.predictions.append(
                    {"path": row["path"], "head": h, "rank": rank, "label": label,
                     "probability": f"{p:.6f}"}
                    for h in self.heads
                    for rank, (label, p) in enumerate(
                        self.soundnet.top_labels(heads[h], h, self.args.topk), 1))
        self.counts[row["status"]] += 1
        if row["status"] != "skipped":
            self.audio_seconds += float(row.get("seconds") or 0)
        self.bar.update()
        self.bar.set_postfix_str(f"{self.audio_seconds / self.elapsed():.0f}x realtime",
                                 refresh=False)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def close(self):
        """Compact the logs; predictions.csv keeps exactly ranks 1..K of the files not failed."""
        self.bar.close()
        with writing_into(self.out):
            self.manifest.compact()
            if self.heads:
                self.predictions.compact(lambda row: int(row["rank"]) <= self.args.topk
                                         and row["path"] not in self.failed_keys)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped; "
                f"{self.audio_seconds / 3600:.2f} h of audio in {self.elapsed():.1f} s "
                f"({self.audio_seconds / self.elapsed():.0f}x realtime)")


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
    key_width = max(map(len, shown))
    cell_width = 2 + max(len(cell) for key in shown for head in ("y_scns", "y_obj")
                         for cell in top.get((key, head), []))
    lines = ["top scenes (Places2) and objects (ImageNet), softmax probability averaged over "
             "each clip's frames:"]
    for key in shown:
        for name, head, title in ((key, "y_scns", "scenes "), ("", "y_obj", "objects")):
            cells = "".join(cell.ljust(cell_width) for cell in top.get((key, head), []))
            lines.append(f"  {name:<{key_width}}  {title}  {cells}".rstrip())
    if len(keys) > len(shown):
        lines.append(f"  ... and {len(keys) - len(shown)} more in {path}")
    return "\n".join(lines)


def short_label(label: str) -> str:
    """A label of predictions.csv in the one readable form (soundnet.readable_label), also
    for rows that earlier versions wrote raw ('/s/stadium/football', 'seashore, coast')."""
    import soundnet   # already imported by the run that wrote the table
    return soundnet.readable_label(label)


def pick_device(name: str, torch) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps and mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps, but torch sees no Apple GPU")
    return name


if __name__ == "__main__":
    sys.exit(main())
