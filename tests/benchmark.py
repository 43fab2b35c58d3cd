"""Where SoundNet feature extraction spends its time and memory (not a pytest test).

    python tests/benchmark.py [--corpus DIR] [--long FILE] [--cache DIR] [--hours H]
                              [--repeats N] [--device cpu|cuda] [--skip-long] [--json PATH]

Without --corpus it generates (once, deterministically; reused from --cache) about --hours of
44.1 kHz stereo MP3s of 10 s to 5 min, plus a 30-minute MP3 in a folder of its own. Each repeat
then runs, one after another (A B C D, A B C D, ...):
  A  extract_feats.py -i CORPUS --quiet --force, as a subprocess: whole-subprocess wall time;
  B  librosa.load(f, sr=22050) over the same files in ONE subprocess: whole-subprocess wall
     time (the ratio A / B compares two whole processes, interpreter and imports included;
     the load loop alone is shown too);
  C  the model alone, in this process on 2 threads: net.extract on synthetic waveforms of
     10 s, 60 s, 5 min and 30 min, and of every corpus file's length ("1 h in pieces");
  D  extract_feats.py on the 30-minute file, sampling every process of its tree every 20 ms
     (the main process and its decode workers): peak of the summed VmRSS (and PSS, which
     counts pages shared after fork once); and librosa.load of that file alone for comparison.
Medians over the repeats are printed, with every run's value so the noise is visible.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
EXTRACTOR = ROOT / "extract_feats.py"
SEED = 20161205                  # corpus generation
CORPUS_RATE, CORPUS_CHANNELS = 44100, 2
MIN_FILE_S, MAX_FILE_S = 10.0, 300.0
LONG_S = 1800.0
SPEC_VERSION = 1                 # bump when the generated content changes
AUDIO_EXTS = (".mp3", ".wav", ".flac", ".ogg")
MODEL_RATE = 22050
MODEL_THREADS = 2
MODEL_LENGTHS_S = (10, 60, 300, 1800)
MIN_TIMING_S = 1.0               # repeat short model calls until a timing lasts this long
RSS_INTERVAL_S = 0.02
GPU_BATCH = 16                   # 10 s clips per batch for the GPU's batched model row
DECODE_SCRIPT = """\
import json, sys, time
t0 = time.perf_counter()
import librosa
files = sys.stdin.read().splitlines()
t1 = time.perf_counter()
for f in files:
    librosa.load(f, sr=22050)
print(json.dumps({"import_s": t1 - t0, "loop_s": time.perf_counter() - t1}))
"""


# -- corpus -----------------------------------------------------------------------------------

def synth_blocks(seconds, seed):
    """(n, 2) float32 blocks of 0.5-4 s: tones, chords, noise bursts and a little silence."""
    rng = np.random.default_rng(seed)
    left = round(seconds * CORPUS_RATE)
    while left > 0:
        n = min(left, int(rng.uniform(0.5, 4.0) * CORPUS_RATE))
        t = np.arange(n) / CORPUS_RATE
        kind = rng.choice(4, p=[0.4, 0.2, 0.3, 0.1])
        if kind in (0, 1):     # a tone, or a chord of three, slightly detuned on the right
            freqs = 80 * 2 ** rng.uniform(0, 5.6, 1 if kind == 0 else 3)
            left_ch = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) for f in freqs)
            right_ch = sum(np.sin(2 * np.pi * f * 1.003 * t) for f in freqs)
            block = 0.3 / len(freqs) * np.stack([left_ch, right_ch], axis=1)
        elif kind == 2:        # noise bursts: decaying envelopes every 0.25-1 s
            envelope = np.exp(-(t % rng.uniform(0.25, 1.0)) / rng.uniform(0.03, 0.2))
            block = 0.25 * rng.standard_normal((n, 2)) * envelope[:, None]
        else:                  # near silence
            block = 1e-4 * rng.standard_normal((n, 2))
        left -= n
        yield block.astype(np.float32)


def write_mp3(path, seconds, seed):
    """Streamed: the encoder gets 4 s at a time, so a 30-minute file needs no GBs."""
    with sf.SoundFile(path, "w", CORPUS_RATE, CORPUS_CHANNELS, format="MP3") as f:
        for block in synth_blocks(seconds, seed):
            f.write(block)


def cached_set(folder: Path, spec: dict, names_lengths: list) -> list:
    """Generate the files once; spec.json (written last) says what a folder holds."""
    spec_path = folder / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec and all(
            (folder / name).exists() for name, _ in names_lengths):
        return [folder / name for name, _ in names_lengths]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    for i, (name, seconds) in enumerate(names_lengths):
        print(f"  generating {folder / name} ({seconds:.0f} s)", file=sys.stderr)
        write_mp3(folder / name, seconds, [SEED, spec["set"], i])
    spec_path.write_text(json.dumps(spec, indent=1))
    print(f"  generated in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return [folder / name for name, _ in names_lengths]


def generated_corpus(cache: Path, hours: float):
    rng, lengths, target = np.random.default_rng(SEED), [], hours * 3600
    while sum(lengths) < target:
        lengths.append(round(max(MIN_FILE_S, min(rng.uniform(MIN_FILE_S, MAX_FILE_S),
                                                 target - sum(lengths))), 2))
    spec = {"version": SPEC_VERSION, "seed": SEED, "set": 0, "rate": CORPUS_RATE,
            "channels": CORPUS_CHANNELS, "lengths": lengths}
    names = [(f"clip_{i:03d}.mp3", s) for i, s in enumerate(lengths)]
    files = cached_set(cache / f"corpus_{hours:g}h", spec, names)
    long_spec = {**spec, "set": 1, "lengths": [LONG_S]}
    long_file = cached_set(cache / "long", long_spec, [("long_30min.mp3", LONG_S)])[0]
    return files, lengths, long_file


def duration(path) -> float:
    try:
        return sf.info(str(path)).duration
    except RuntimeError:
        import librosa
        return librosa.get_duration(path=str(path))


# -- measurements -------------------------------------------------------------------------------

def extractor_cmd(folder, out, exts, device):
    return [sys.executable, str(EXTRACTOR), "-i", str(folder), "-o", str(out), "-f", *exts,
            "--quiet", "--force", "--device", device]


def run_timed(cmd, stdin=None) -> tuple:
    started = time.perf_counter()
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return wall, result.stdout


def tree(root: int) -> list:
    """root and all its descendants, by their parent links in /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo += children.get(pids[-1], [])
    return pids


def field_kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0   # gone, or a zombie


def run_sampled(cmd, stdin=None) -> dict:
    """Wall time and the peak over time of the tree's summed VmRSS and PSS, in MB."""
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        proc.stdin.write(stdin or "")
        proc.stdin.close()
        peak_rss = peak_pss = 0
        while proc.poll() is None:
            pids = tree(proc.pid)
            peak_rss = max(peak_rss, sum(field_kb(f"/proc/{p}/status", "VmRSS:") for p in pids))
            peak_pss = max(peak_pss, sum(field_kb(f"/proc/{p}/smaps_rollup", "Pss:")
                                         for p in pids))
            time.sleep(RSS_INTERVAL_S)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
    return {"wall_s": wall, "rss_mb": peak_rss / 1024, "pss_mb": peak_pss / 1024}


def time_model(net, wave, device) -> float:
    """Seconds per net.extract(wave), averaged over enough calls to last MIN_TIMING_S."""
    import torch
    calls, started = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - started < MIN_TIMING_S:
        net.extract(wave)
        calls += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def model_runs(net, device, lengths, add):
    noise = np.random.default_rng(SEED).uniform(-0.5, 0.5, int(max(MODEL_LENGTHS_S) * MODEL_RATE))
    noise = noise.astype(np.float32)
    for seconds in MODEL_LENGTHS_S:
        add(f"model {seconds} s", time_model(net, noise[:seconds * MODEL_RATE], device))
    started = time.perf_counter()   # every corpus file's length, views of one buffer
    for seconds in lengths:
        net.extract(noise[:int(seconds * MODEL_RATE)])
    add("model corpus pieces", time.perf_counter() - started)
    if device == "cuda":
        batch = np.stack([noise[:10 * MODEL_RATE]] * GPU_BATCH)
        add(f"model {GPU_BATCH} x 10 s batch", time_model(net, batch, device))


# -- report -------------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem_gb:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")


def report(results: dict, audio_s: float, n_files: int, long_s: float, device: str) -> list:
    rows = []

    def row(name, key, seconds=None, unit="s", note=""):
        runs = results.get(key)
        if not runs:
            return
        med = statistics.median(runs)
        speed = f"{seconds / med:.0f}x" if seconds else ""
        rows.append((name, f"{med:.2f} {unit}" if unit == "s" else f"{med:.0f} {unit}",
                     speed, " ".join(f"{r:.2f}" if unit == "s" else f"{r:.0f}" for r in runs),
                     note))

    hours = f"{audio_s / 3600:.2f} h, {n_files} files"
    for dev in ("cpu", "cuda") if device == "cuda" else ("cpu",):
        row(f"end-to-end extract_feats.py --device {dev} ({hours})", f"e2e {dev}", audio_s)
    row("decode only, librosa.load sr=22050, 1 process", "decode", audio_s)
    row("  of which the librosa.load loop", "decode loop", audio_s)
    med = statistics.median
    if results.get("decode"):
        ratio = med(results["e2e cpu"]) / med(results["decode"])
        strict = med(results["e2e cpu"]) / med(results["decode loop"])
        rows.append(("ratio end-to-end / decode-only (whole processes)", f"{ratio:.2f}", "",
                     f"vs loop only: {strict:.2f}", "target <= 1.0, aim 0.8"))
    speeds = []
    for seconds in MODEL_LENGTHS_S:
        label = f"{seconds} s" if seconds < 60 else f"{seconds // 60} min"
        row(f"model alone {label} ({device}, {MODEL_THREADS} threads)", f"model {seconds} s",
            seconds)
        speeds.append(seconds / med(results[f"model {seconds} s"]))
    row(f"model alone {hours} in pieces", "model corpus pieces", audio_s)
    row(f"model alone {GPU_BATCH} x 10 s batch", f"model {GPU_BATCH} x 10 s batch",
        GPU_BATCH * 10)
    rows.append(("model alone: slowest / fastest length", f"{min(speeds) / max(speeds):.2f}", "",
                 "", "target >= 1000x, flat within 20%"))
    row("extract_feats.py on the 30-min file, wall", "long wall", long_s)
    row("peak RSS extract_feats on 30-min file (tree sum)", "long rss", unit="MB",
        note="target < 1000, aim 600")
    row("  same, PSS (shared pages counted once)", "long pss", unit="MB")
    row("peak RSS librosa.load on 30-min file, 1 process", "decode long rss", unit="MB")
    row("  its wall", "decode long wall", long_s)
    head = ("measurement", "median", "x-realtime", "runs", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [head, tuple("-" * w for w in widths)] + rows]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, help="existing folder of audio (walked recursively)")
    p.add_argument("--long", type=Path, help="long file for the memory run (default: the "
                   "generated 30-min MP3, or the longest file of --corpus)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "soundnet-bench")
    p.add_argument("--hours", type=float, default=1.0, help="size of the generated corpus")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--skip-long", action="store_true", help="no 30-minute file runs")
    p.add_argument("--json", type=Path, help="also save the raw numbers here")
    args = p.parse_args(argv)

    if args.corpus:
        files = sorted(f for f in args.corpus.rglob("*") if f.suffix.lower() in AUDIO_EXTS)
        lengths = [duration(f) for f in files]
        long_file = args.long or files[int(np.argmax(lengths))]
    else:
        files, lengths, long_file = generated_corpus(args.cache, args.hours)
        long_file = args.long or long_file
    corpus = args.corpus or files[0].parent
    exts = sorted({f.suffix.lower() for f in files})
    audio_s, long_s = sum(lengths), duration(long_file)

    import torch
    sys.path.insert(0, str(ROOT))
    from soundnet import SoundNet
    devices = ["cpu"]
    if args.device == "cuda":
        if torch.cuda.is_available():
            devices.append("cuda")
        else:
            print("no CUDA device: GPU rows skipped", file=sys.stderr)
    torch.set_num_threads(MODEL_THREADS)
    net = SoundNet.from_pretrained(device=devices[-1])
    net.extract(np.zeros(10 * MODEL_RATE, np.float32))   # warm-up: fused weights, allocator

    results = {}

    def add(key, value):
        results.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="soundnet-bench-") as tmp:
        long_dir = Path(tmp) / "long"
        long_dir.mkdir()
        (long_dir / long_file.name).symlink_to(long_file.absolute())
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
            for dev in devices:                                              # A
                add(f"e2e {dev}", run_timed(extractor_cmd(corpus, Path(tmp) / f"out{r}{dev}",
                                                          exts, dev))[0])
            wall, out = run_timed([sys.executable, "-c", DECODE_SCRIPT],    # B
                                  "\n".join(map(str, files)))
            add("decode", wall)
            add("decode loop", json.loads(out)["loop_s"])
            model_runs(net, devices[-1], lengths, add)                         # C
            if not args.skip_long:                                           # D
                sampled = run_sampled(extractor_cmd(long_dir, Path(tmp) / f"long{r}",
                                                    [long_file.suffix.lower()], "cpu"))
                add("long wall", sampled["wall_s"])
                add("long rss", sampled["rss_mb"])
                add("long pss", sampled["pss_mb"])
                sampled = run_sampled([sys.executable, "-c", DECODE_SCRIPT], str(long_file))
                add("decode long wall", sampled["wall_s"])
                add("decode long rss", sampled["rss_mb"])
            print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()),
                  file=sys.stderr)

    lines = [f"SoundNet benchmark: {machine()}",
             (f"corpus {corpus} ({audio_s / 3600:.2f} h, {len(files)} files); long file "
              f"{long_file} ({long_s / 60:.1f} min); {args.repeats} repeats, interleaved"), ""]
    lines += report(results, audio_s, len(files), long_s, args.device if len(devices) > 1
                    else "cpu")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "audio_s": audio_s,
                                         "files": len(files), "long_s": long_s,
                                         "runs": results}, indent=1))


if __name__ == "__main__":
    main()
