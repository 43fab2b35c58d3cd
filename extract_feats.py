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
import fcntl
import json
import multiprocessing
import os
import queue
import signal
import sys
import time
import zlib
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from soundnet_io import (CHANNEL_POLICIES, MIN_SECONDS, SAMPLE_RATE, TILING_RULE, AudioError,
                         atomic_write, open_audio, save_array, tile_clip)

MANIFEST_FIELDS = ["path", "status", "seconds", "sample_rate", "channels", "frames", "error"]
PREDICTION_FIELDS = ["path", "head", "rank", "label", "probability"]
TABLE_FILES = 20     # --topk prints the top labels of at most this many files
QUEUE_BLOCKS = 24    # decoded ~10 s blocks a worker may run ahead of the model
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class UsageError(Exception):
    """A configuration problem found before any work: exit 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="sound8.npy weights (default models/sound8.npy, fetched if missing)")
    p.add_argument("-i", "--input", type=Path, help="folder of audio files, walked recursively")
    p.add_argument("--list", type=Path,
                   help="text file of audio paths, one per line (instead of walking -i; "
                        "output paths are relative to -i if given, else to their common folder)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("-f", "--ext", nargs="+", default=[".mp3"],
                   help="file extensions to take, e.g. -f .mp3 .wav .flac")
    p.add_argument("--features", nargs="+", default=["conv7", "y_obj", "y_scns"],
                   help="feature names (conv1..conv7, pool1, pool2, pool5, y_obj, y_scns) "
                        "or Torch module indices 1-26")
    p.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                   help="repeat shorter audio whole, floor(L/n)+1 times for n < L samples, as "
                        "the earlier port did; 0: no tiling")
    p.add_argument("--channel", choices=CHANNEL_POLICIES, default="mean",
                   help="downmix: mean of channels, or the first channel (original Torch code)")
    p.add_argument("--force", action="store_true", help="redo inputs whose outputs exist")
    p.add_argument("--workers", type=int, default=CPUS,
                   help="decode processes (0: decode in the main process)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--batch-size", type=int, default=None,
                   help="files of equal decoded length run as one batch (default 1 on CPU, "
                        "16 on a GPU); longer files than the model's chunk are streamed alone")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="process only the K-th of N deterministic parts of the inputs (1 <= K "
                        "<= N), so N processes can share one output folder")
    p.add_argument("--topk", type=int, default=0,
                   help="also write OUT/predictions.csv with the top K object and scene labels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.input is None and args.list is None:
        p.error("give -i/--input (a folder) or --list (a file of paths)")
    if args.shard:
        k, _, n = args.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            p.error(f"--shard takes K/N with 1 <= K <= N, not {args.shard!r}")
        args.shard = (int(k), int(n))
    if args.workers < 0 or args.min_seconds < 0 or args.topk < 0 or (args.batch_size or 1) < 1:
        p.error("--workers, --min-seconds and --topk must be >= 0, --batch-size >= 1")
    args.ext = sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in args.ext})
    return args


# -- inputs ------------------------------------------------------------------------------------

def find_inputs(args) -> dict:
    """{output key: input path}, sorted by key. The key is the path relative to the root
    without its extension, in posix form ("a/x" for a/x.mp3). Raises UsageError when the root
    is missing or two inputs share a key (x.mp3 and x.wav side by side)."""
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
        if not root.is_dir():
            raise UsageError(f"-i {root}: no such folder")
        paths = sorted(Path(folder) / name
                       for folder, dirs, files in os.walk(root)
                       for name in dirs + files if Path(name).suffix.lower() in args.ext)
    inputs, clashes = {}, []
    for path in paths:
        try:
            relative = path.absolute().relative_to(root.absolute())
        except ValueError:
            raise UsageError(f"{path} is not inside -i {root}") from None
        key = relative.with_suffix("").as_posix()
        if key in inputs:
            clashes.append(f"  {inputs[key]} and {path} -> {key}.npy")
        inputs[key] = path
    if clashes:
        raise UsageError("inputs that would write the same output:\n" + "\n".join(clashes))
    return dict(sorted(inputs.items()))


def in_shard(key: str, shard) -> bool:
    """Deterministic split by a hash of the output key: stable when files are added."""
    return shard is None or zlib.crc32(key.encode("utf-8")) % shard[1] == shard[0] - 1


# -- decoding (worker processes: no torch here) ---------------------------------------------------

def decode_worker(tasks, results, channel):
    """Takes one list of paths from `tasks`, then decodes each in turn into `results`:
    ("info", AudioInfo), ("block", samples)..., ("end", None); or ("error", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
    parent = os.getppid()

    def put(message):
        while True:
            try:
                return results.put(message, timeout=1.0)
            except queue.Full:
                if os.getppid() != parent:   # the main process is gone (killed): stop too
                    os._exit(1)

    for path in tasks.get():
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
        self.channel, self.paths = channel, []
        context = multiprocessing.get_context("fork")
        self.workers = [self._launch(context) for _ in range(workers)]

    def _launch(self, context):
        tasks, results = context.SimpleQueue(), context.Queue(QUEUE_BLOCKS)
        process = context.Process(target=decode_worker, args=(tasks, results, self.channel),
                                  daemon=True)
        process.start()
        return process, tasks, results

    def start(self, paths: list):
        self.paths = list(paths)
        for w, (_, tasks, _) in enumerate(self.workers):
            tasks.put(self.paths[w::len(self.workers)])

    def busy(self, i: int) -> int:
        """How many workers still decode once file i has been received."""
        return sum(1 for w in range(len(self.workers)) if i + 1 + w < len(self.paths))

    def file(self, i: int):
        """File i as (AudioInfo, iterator of blocks); raises AudioError. Run the iterator to
        its end before asking for the next file."""
        if not self.workers:
            return open_audio(self.paths[i], channel=self.channel)
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
    """Serialise manifest and metadata updates between --shard processes on one OUT."""
    with open(out / ".soundnet.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class CsvLog:
    """A CSV written as you go (rows appended under the lock, so an interrupted run keeps what
    it did) and compacted at the end of a run: the last row per key, sorted, atomically."""

    def __init__(self, path: Path, fields, key_fields):
        self.path, self.fields, self.key_fields = path, fields, key_fields

    def append(self, rows):
        with locked(self.path.parent), open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.fields)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)

    def rows(self) -> dict:
        """{key: last row for it}."""
        if not self.path.exists():
            return {}
        with open(self.path, newline="", encoding="utf-8") as f:
            return {tuple(r[k] for k in self.key_fields): r for r in csv.DictReader(f)}

    def compact(self):
        with locked(self.path.parent):
            rows = self.rows()
            with atomic_write(self.path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(row for _, row in sorted(rows.items()))


def write_metadata(out: Path, args, layers, sha256: str):
    """OUT/soundnet.json: what a reader needs to interpret the arrays. Refuses (UsageError) an
    OUT whose existing arrays were made with other settings, unless --force."""
    settings = {"sample_rate": SAMPLE_RATE, "weights_sha256": sha256,
                "min_seconds": args.min_seconds, "tiling": TILING_RULE, "channel": args.channel}
    path = out / "soundnet.json"
    with locked(out):
        meta = json.loads(path.read_text()) if path.exists() else {}
        old = {k: meta[k] for k in settings if k in meta}
        if old and old != settings and not args.force:
            raise UsageError(f"{out} holds features made with {old}, not {settings}: use "
                             "another -o, or --force to redo everything with the new settings")
        features = {} if old != settings else meta.get("features", {})
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


# -- the run --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        inputs = {k: p for k, p in find_inputs(args).items() if in_shard(k, args.shard)}
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    decoders = Decoders(min(args.workers, len(inputs)), args.channel)   # before torch
    try:
        return run(args, inputs, decoders)
    finally:
        decoders.close()


def run(args, inputs: dict, decoders: Decoders) -> int:
    import torch
    import soundnet

    try:
        layers = [soundnet.get_layer(name) for name in args.features]
        device = pick_device(args.device, torch)
        net = soundnet.SoundNet.from_pretrained(args.model or soundnet.WEIGHTS_PATH, device)
        args.output.mkdir(parents=True, exist_ok=True)
        write_metadata(args.output, args, layers, net.weights_sha256)
    except (ValueError, UsageError, soundnet.WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job = Extraction(args, net, layers, device, len(inputs))
    todo = [k for k in inputs if args.force or not job.done(k)]
    decoders.start([inputs[k] for k in todo])
    todo_keys = set(todo)
    for key in inputs:
        if key not in todo_keys:
            job.skip(key)
    torch.set_num_threads(max(1, CPUS - len(decoders.workers)))
    interrupted = False
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
            # Once the decoders run out of files, give the model their cores.
            threads = max(1, CPUS - decoders.busy(i))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        job.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        job.close()
    if args.topk and not interrupted:
        print(predictions_table(args.output / "predictions.csv", list(inputs)), flush=True)
    print(job.summary() + (" (interrupted)" if interrupted else ""), file=sys.stderr)
    if interrupted:
        return 130
    return 1 if job.counts["failed"] else 0


class Extraction:
    """The outputs of one run: feature arrays, manifest and predictions rows, counts, the
    progress bar; and the batching of short files."""

    def __init__(self, args, net, layers, device: str, n_inputs: int):
        import soundnet
        self.soundnet, self.args, self.net, self.out = soundnet, args, net, args.output
        self.names = list(dict.fromkeys(layer.name for layer in layers))
        self.heads = ["y_obj", "y_scns"] if args.topk else []
        self.computed = list(dict.fromkeys(self.names + self.heads))
        self.longest_minimum = max(map(soundnet.get_layer, self.computed),
                                   key=lambda layer: layer.min_samples)
        self.stream_above = int(soundnet.CHUNK_SECONDS * SAMPLE_RATE)  # longer: streamed
        self.batch_size = args.batch_size or (1 if device == "cpu" else 16)
        self.pending = {}   # decoded length -> [(key, info, n_samples, wave)] for a batch
        self.manifest = CsvLog(self.out / "manifest.csv", MANIFEST_FIELDS, ["path"])
        self.predictions = CsvLog(self.out / "predictions.csv", PREDICTION_FIELDS,
                                  ["path", "head", "rank"])
        self.previous = self.manifest.rows()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.audio_seconds, self.started = 0.0, time.perf_counter()
        self.bar = tqdm(total=n_inputs, unit="file", disable=args.quiet or None,
                        dynamic_ncols=True)

    def done(self, key: str) -> bool:
        return all((self.out / name / f"{key}.npy").exists() for name in self.names)

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
        """A short file, whole: tiled to --min-seconds, then batched with others of its
        length (a GPU's speed; on the CPU the batch is one file by default)."""
        wave = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        n_samples = len(wave)
        if n_samples == 0:
            raise AudioError("no samples (decodes to 0 samples)")
        wave = tile_clip(wave, self.args.min_seconds)
        if len(wave) < self.longest_minimum.min_samples:   # fail it here, not its batch
            raise ValueError(self.soundnet.too_short_message(self.longest_minimum, len(wave)))
        group = self.pending.setdefault(len(wave), [])
        group.append((key, info, n_samples, wave))
        if len(group) >= self.batch_size:
            self._run_batch(self.pending.pop(len(wave)))
        elif sum(map(len, self.pending.values())) >= self.batch_size:
            self.flush()   # lengths differ: run what waits rather than hold ever more files

    def flush(self):
        for length in list(self.pending):
            self._run_batch(self.pending.pop(length))

    def _run_batch(self, group):
        feats = self.net.extract(np.stack([wave for *_, wave in group]), self.computed)
        for i, (key, info, n_samples, _) in enumerate(group):
            self.save(key, info, n_samples, {name: f[i] for name, f in feats.items()})

    # -- rows ---------------------------------------------------------------------------------------

    def save(self, key, info, n_samples, feats):
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
        self._finish(row)

    def skip(self, key):
        """Outputs already there: the manifest keeps what the earlier run recorded."""
        saved = {h: self.out / h / f"{key}.npy" for h in self.heads}
        heads = ({h: np.load(p, allow_pickle=False) for h, p in saved.items()}
                 if self.heads and all(p.exists() for p in saved.values()) else None)
        self._finish({**self.previous.get((key,), {"path": key}), "status": "skipped",
                      "error": ""}, heads)

    def _finish(self, row: dict, heads=None):
        self.counts[row["status"]] += 1
        self.manifest.append([row])
        if heads:
            self.predictions.append(
                {"path": row["path"], "head": h, "rank": rank, "label": label,
                 "probability": f"{p:.6f}"}
                for h in self.heads
                for rank, (label, p) in enumerate(
                    self.soundnet.top_labels(heads[h], h, self.args.topk), 1))
        if row["status"] != "skipped":
            self.audio_seconds += float(row.get("seconds") or 0)
        self.bar.update()
        self.bar.set_postfix_str(f"{self.audio_seconds / self.elapsed():.0f}x realtime",
                                 refresh=False)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def close(self):
        self.bar.close()
        self.manifest.compact()
        if self.heads:
            self.predictions.compact()

    def summary(self) -> str:
        c = self.counts
        return (f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped; "
                f"{self.audio_seconds / 3600:.2f} h of audio in {self.elapsed():.1f} s "
                f"({self.audio_seconds / self.elapsed():.0f}x realtime)")


def predictions_table(path: Path, keys: list, max_files: int = TABLE_FILES) -> str:
    """predictions.csv made readable on a terminal: the top scenes and objects of the first
    max_files of `keys` that have predictions, two aligned lines per file; further files are
    counted, not printed, so a folder of thousands of files still gives a short table."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["rank"]))
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
    """'/s/stadium/football' -> 'stadium/football'; 'seashore, coast, ...' -> 'seashore'."""
    if label.startswith("/"):
        label = label[3:]
    return label.split(",")[0].replace("_", " ")


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
