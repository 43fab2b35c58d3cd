"""Where SoundNet feature extraction spends its time and memory (a script, not a pytest test).

    python tests/benchmark.py [--corpus DIR] [--long FILE] [--cache DIR] [--hours H]
                              [--repeats N] [--device cpu|cuda] [--skip-long] [--json PATH]
                              [--only clips|videos] [--skip-video]

Without --corpus it generates once, deterministically, and reuses from --cache: about --hours of
44.1 kHz stereo MP3s of 10 s to 5 min, and a 30-minute MP3 in a folder of its own. After one
untimed warm-up of A and B, each repeat runs A B C D in turn; medians are printed with every
run's value, so the noise shows.
  A  extract_feats.py -i CORPUS --quiet --force as a subprocess (wall time of the whole process,
     interpreter start and imports included; the extractor's own timer, which starts after
     the model is loaded, is shown too); beside it the decoders' own bound: the same run with
     the model stubbed out (STUB_SCRIPT: same worker processes, tiling, batching and writes),
     with the CPU the main process spends per file, model excluded;
  B  librosa.load(f, sr=22050) over the same files in ONE subprocess, timed the same way (whole
     process); the ratio A / B compares these two. The load loop alone (librosa's ~2 s of
     lazy imports done before it) is shown too, with the ratio against it;
  C  the model alone in this process on MODEL_THREADS threads: net.extract on synthetic waves of
     10 s .. 30 min, and of every corpus file's length ("in pieces");
  D  extract_feats.py on the 30-minute file, summing VmRSS (and PSS, which counts pages shared
     after fork once) over its process tree every 20 ms, decode workers included; the peak of
     the sum is reported, next to librosa.load of the same file in one process.
  E  folders of short clips, as datasets hold them: 10 s clips a few ms apart in length (44.1 kHz
     stereo MP3, as cut from videos) and 5.000 s clips (44.1 kHz mono WAV, as ESC-50): A at the
     default batch size and with --batch-size 1, the model stubbed (as in A), and B, on each.
  F  videos (needs ffmpeg; generated too): extract_feats.py on a 1-hour M4A (AAC) and on a
     folder of 10 s MP4 clips (a 160x120 test pattern and AAC), peak RSS of the tree and wall;
     next to librosa.load of the same files (audioread: ffmpeg) and our decoding alone
     (soundnet_io.open_audio: ffmpeg), each in one process.
  G  the model's fidelity and cost per device, once: max error / peak of every layer against a
     float64 run on the CPU; per batch of LAUNCH_BATCH x 30 s clips, the aten operations that
     compute (views left out: on a GPU each is a kernel launch) and those that wait for the
     device, on the CPU's path and on the path of every other device (run on the CPU too, so
     the counts show without a GPU); with --device cuda, the GPU memory peak of that batch.
With --only clips, just E and C run (C on the lengths of a --hours corpus); with --only videos,
just F.
"""
import argparse
import json
import os
import platform
import re
import resource
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
SEED = 20161205
CORPUS_RATE, CORPUS_CHANNELS = 44100, 2
MIN_FILE_S, MAX_FILE_S, LONG_S = 10.0, 300.0, 1800.0
SPEC_VERSION = 1                 # bump when the generated content changes
AUDIO_EXTS = (".mp3", ".wav", ".flac", ".ogg")
MODEL_RATE = 22050
MODEL_THREADS = 2
MODEL_LENGTHS_S = (10, 60, 300, 1800)
MIN_TIMING_S = 1.0               # short model calls are repeated until a timing lasts this long
RSS_INTERVAL_S = 0.02
GPU_BATCH = 16                   # 10 s clips per batch for the GPU's batched row
LAUNCH_BATCH = 64                # 30 s clips per batch for G's counts and memory peak
FIDELITY_S = 30                  # seconds of audio for G's fidelity rows
SYNC_OPS = ("equal", "_local_scalar_dense", "item")   # these wait for the device
CLIPS_BATCH = 16                 # 30 s waveforms of slightly different lengths in one list
# E: (name, number of clips, seconds, spread of the length in seconds, channels, format)
CLIP_SETS = (("clips_10s", 341, 10.0, 0.05, 2, "MP3"), ("clips_5s", 400, 5.0, 0.0, 1, "WAV"))
VIDEO_LONG_S, VIDEO_CLIPS, VIDEO_CLIP_S = 3600.0, 120, 10.0
VIDEO_PATTERN = "testsrc=size=160x120:rate=10"   # the picture of the MP4 clips
DECODE_SCRIPT = """\
import json, sys, time
import librosa
load = librosa.load   # librosa imports lazily: import it here, before the timed loop
files = sys.stdin.read().splitlines()
started = time.perf_counter()
for f in files:
    load(f, sr=22050)
print(json.dumps({"loop_s": time.perf_counter() - started}))
"""
OUR_DECODE_SCRIPT = f"""\
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from soundnet_io import open_audio
files = sys.stdin.read().splitlines()
started = time.perf_counter()
for f in files:
    for block in open_audio(f)[1]:   # streamed: blocks are dropped as they come
        pass
print(json.dumps({{"loop_s": time.perf_counter() - started}}))
"""
# extract_feats.py with the model stubbed out (zero arrays of the right shapes): the same decode
# workers, tiling, batching and writing, so its wall time is what the decoders (and the writes)
# allow, the bound of an end-to-end run on a fast GPU. Prints the CPU seconds the main thread
# (the one that feeds the model) and the whole main process spent per file, from the model
# loaded to the last file written.
STUB_SCRIPT = f"""\
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
import extract_feats

def zeros(layers, n_samples):
    layers = [net_module.get_layer(name) for name in layers]
    return {{l.name: np.zeros((l.n_frames(n_samples), l.channels), np.float32) for l in layers}}

def extract_many(waves, layers, *args, **kwargs):
    return [zeros(layers, len(w)) for w in waves]

def extract_stream(blocks, layers, *args, **kwargs):
    return zeros(layers, sum(len(b) for b in blocks))

marks, init, close = {{}}, extract_feats.Batcher.__init__, extract_feats.Ledger.close

def stubbed_init(self, *args, **kwargs):
    global net_module
    init(self, *args, **kwargs)
    net_module = self.soundnet
    self.net.extract_many, self.net.extract_stream = extract_many, extract_stream
    marks["start"] = time.thread_time(), time.process_time()

def timed_close(self):
    close(self)
    thread, process = time.thread_time(), time.process_time()
    files = self.counts["ok"] + self.counts["failed"]
    print(json.dumps({{"files": files,
                      "main_thread_cpu_s": thread - marks["start"][0],
                      "process_cpu_s": process - marks["start"][1]}}))

extract_feats.Batcher.__init__, extract_feats.Ledger.close = stubbed_init, timed_close
if __name__ == "__main__":
    sys.exit(extract_feats.main())
"""


# -- corpus -------------------------------------------------------------------------------------

def synth_blocks(seconds, seed):
    """(n, 2) float32 blocks of 0.5-4 s: tones, chords, noise bursts and a little silence."""
    rng = np.random.default_rng(seed)
    left = round(seconds * CORPUS_RATE)
    while left > 0:
        n = min(left, int(rng.uniform(0.5, 4.0) * CORPUS_RATE))
        t = np.arange(n) / CORPUS_RATE
        kind = rng.choice(4, p=[0.4, 0.2, 0.3, 0.1])
        if kind in (0, 1):     # a tone or a chord of three, detuned a little on the right
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


def cached_set(folder: Path, spec: dict, names_lengths: list, channels=CORPUS_CHANNELS,
               fmt="MP3") -> list:
    """The files, generated unless spec.json (written last) says the folder holds them."""
    spec_path = folder / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec and all(
            (folder / name).exists() for name, _ in names_lengths):
        return [folder / name for name, _ in names_lengths]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, (name, seconds) in enumerate(names_lengths):
        print(f"  generating {folder / name} ({seconds:.0f} s)", file=sys.stderr)
        # Streamed, 4 s at a time: the 30-minute file needs no GBs.
        with sf.SoundFile(folder / name, "w", CORPUS_RATE, channels, format=fmt) as f:
            for block in synth_blocks(seconds, [SEED, spec["set"], i]):
                f.write(block[:, :channels])
    spec_path.write_text(json.dumps(spec, indent=1))
    return [folder / name for name, _ in names_lengths]


def generated_corpus(cache: Path, hours: float):
    rng, lengths, target = np.random.default_rng(SEED), [], hours * 3600
    while sum(lengths) < target:
        lengths.append(round(max(MIN_FILE_S, min(rng.uniform(MIN_FILE_S, MAX_FILE_S),
                                                 target - sum(lengths))), 2))
    spec = {"version": SPEC_VERSION, "seed": SEED, "set": 0, "rate": CORPUS_RATE,
            "channels": CORPUS_CHANNELS, "lengths": lengths}
    files = cached_set(cache / f"corpus_{hours:g}h", spec,
                       [(f"clip_{i:03d}.mp3", s) for i, s in enumerate(lengths)])
    long_spec = {**spec, "set": 1, "lengths": [LONG_S]}
    long_file = cached_set(cache / "long", long_spec, [("long_30min.mp3", LONG_S)])[0]
    return files, lengths, long_file


def clip_sets(cache: Path) -> dict:
    """E's folders: {name: (files, lengths in seconds)}. Lengths are whole samples at 44.1 kHz,
    spread uniformly by up to the set's spread (MP3 clips cut from videos differ by ms)."""
    sets = {}
    for set_id, (name, count, seconds, spread, channels, fmt) in enumerate(CLIP_SETS, start=2):
        rng = np.random.default_rng([SEED, set_id])
        lengths = [round((seconds + rng.uniform(-spread, spread)) * CORPUS_RATE) / CORPUS_RATE
                   for _ in range(count)]
        spec = {"version": SPEC_VERSION, "seed": SEED, "set": set_id, "rate": CORPUS_RATE,
                "channels": channels, "format": fmt, "lengths": lengths}
        files = cached_set(cache / name, spec, [(f"clip_{i:03d}.{fmt.lower()}", s)
                                               for i, s in enumerate(lengths)], channels, fmt)
        sets[name] = (files, lengths)
    return sets


def generated_videos(cache: Path):
    """A 1-hour M4A and a folder of VIDEO_CLIPS MP4 clips of VIDEO_CLIP_S each, made by ffmpeg
    from synth_blocks audio (44.1 kHz stereo, piped in as float32). None without ffmpeg."""
    if shutil.which("ffmpeg") is None:
        print("ffmpeg is not installed: video rows skipped", file=sys.stderr)
        return None
    spec = {"version": SPEC_VERSION, "seed": SEED, "rate": CORPUS_RATE, "long_s": VIDEO_LONG_S,
            "clips": VIDEO_CLIPS, "clip_s": VIDEO_CLIP_S, "pattern": VIDEO_PATTERN}
    folder, clips = cache / "video", cache / "video" / "clips"
    long_file = folder / "long_1h.m4a"
    spec_path = folder / "spec.json"
    if not (spec_path.exists() and json.loads(spec_path.read_text()) == spec):
        shutil.rmtree(folder, ignore_errors=True)
        clips.mkdir(parents=True)
        audio_in = ["-f", "f32le", "-ar", str(CORPUS_RATE), "-ac", str(CORPUS_CHANNELS),
                    "-i", "pipe:"]
        fps, clips_s = int(VIDEO_PATTERN.rsplit("=", 1)[1]), VIDEO_CLIPS * VIDEO_CLIP_S
        for seconds, seed, args in [
                (VIDEO_LONG_S, 2, [*audio_in, "-c:a", "aac", str(long_file)]),
                (clips_s, 3,
                 ["-f", "lavfi", "-i", VIDEO_PATTERN, *audio_in, "-t", str(clips_s),
                  "-c:v", "mpeg4", "-g", str(fps), "-c:a", "aac", "-f", "segment",
                  "-segment_time", str(VIDEO_CLIP_S), "-reset_timestamps", "1",
                  str(clips / "clip_%03d.mp4")])]:
            print(f"  generating {seconds:.0f} s of video audio in {folder}", file=sys.stderr)
            ffmpeg = subprocess.Popen(["ffmpeg", "-v", "error", "-y", *args],
                                      stdin=subprocess.PIPE)
            try:
                for block in synth_blocks(seconds, [SEED, seed, 0]):
                    ffmpeg.stdin.write(block.tobytes())
                ffmpeg.stdin.close()
            except BrokenPipeError:   # -t reached: ffmpeg took what it needs
                pass
            if ffmpeg.wait() != 0:
                sys.exit("ffmpeg failed to make the video corpus")
        spec_path.write_text(json.dumps(spec, indent=1))
    return long_file, sorted(clips.glob("*.mp4"))


def video_runs(videos, tmp: Path, r: int, add):
    """Section F: the 1-hour M4A (memory sampled) and the folder of MP4 clips (timed)."""
    long_file, clips = videos
    decoders = {"librosa": [sys.executable, "-c", DECODE_SCRIPT],
                "ours": [sys.executable, "-c", OUR_DECODE_SCRIPT]}
    run = run_sampled(extractor_cmd(long_file.parent, tmp / f"vlong{r}", [".m4a"], "cpu"))
    add("video long wall", run["wall"])
    add("video long rss", run["rss"])
    for name, cmd in decoders.items():
        run = run_sampled(cmd, str(long_file))
        add(f"video long {name} wall", run["wall"])
        add(f"video long {name} rss", run["rss"])
    run = run_timed(extractor_cmd(clips[0].parent, tmp / f"vclips{r}", [".mp4"], "cpu"))
    add("video clips e2e", run["wall"])
    for name, cmd in decoders.items():
        run = run_timed(cmd, "\n".join(map(str, clips)))
        add(f"video clips {name}", run["wall"])
        add(f"video clips {name} loop", json.loads(run["stdout"])["loop_s"])


def duration(path) -> float:
    try:
        return sf.info(str(path)).duration
    except RuntimeError:
        import librosa
        return librosa.get_duration(path=str(path))


# -- measurements -------------------------------------------------------------------------------

def extractor_cmd(folder, out, exts, device, *extra):
    return [sys.executable, str(EXTRACTOR), "-i", str(folder), "-o", str(out), "-f", *exts,
            "--quiet", "--force", "--device", device, *extra]


def stub_run(folder, out, exts, device, add, prefix):
    """A with the model stubbed out: the decoders' bound, and the main process's CPU per file."""
    run = run_timed([sys.executable, "-c", STUB_SCRIPT,
                     *extractor_cmd(folder, out, exts, device)[2:]])
    cpu = json.loads(run["stdout"].splitlines()[-1])
    add(f"{prefix} stub", run["wall"])
    add(f"{prefix} stub thread ms", 1e3 * cpu["main_thread_cpu_s"] / cpu["files"])
    add(f"{prefix} stub process ms", 1e3 * cpu["process_cpu_s"] / cpu["files"])
    shutil.rmtree(out)


def run_timed(cmd, stdin=None) -> dict:
    """Wall and CPU (user + sys of the whole tree) seconds of a subprocess, and its output."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall": wall, "cpu": cpu, "stdout": result.stdout, "stderr": result.stderr}


def cpu_seconds() -> tuple:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for
    children): their difference over a run is what other processes used meanwhile."""
    busy = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ours = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return ((sum(busy) - busy[3] - busy[4]) / os.sysconf("SC_CLK_TCK"),   # minus idle, iowait
            sum(u.ru_utime + u.ru_stime for u in ours))


def tree(root: int) -> list:
    """root and all its descendants, by the parent links in /proc/*/stat."""
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


def field_mb(path: str, key: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0   # gone, or a zombie


def run_sampled(cmd, stdin="") -> dict:
    """Wall seconds and the peaks over time of the tree's summed VmRSS and PSS, in MB."""
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        proc.stdin.write(stdin)
        proc.stdin.close()
        rss = pss = 0.0
        while proc.poll() is None:
            pids = tree(proc.pid)
            rss = max(rss, sum(field_mb(f"/proc/{p}/status", "VmRSS:") for p in pids))
            pss = max(pss, sum(field_mb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
            time.sleep(RSS_INTERVAL_S)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
    return {"wall": wall, "rss": rss, "pss": pss}


def time_model(net, wave, device) -> float:
    """Seconds per net.extract(wave), averaged over calls lasting at least MIN_TIMING_S."""
    import torch
    calls, started = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - started < MIN_TIMING_S:
        net.extract(wave)
        calls += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def model_runs(net, device, lengths, add):
    noise = np.random.default_rng(SEED).uniform(-0.5, 0.5, max(MODEL_LENGTHS_S) * MODEL_RATE)
    noise = noise.astype(np.float32)
    for seconds in MODEL_LENGTHS_S:
        add(f"model {device} {seconds}", time_model(net, noise[:seconds * MODEL_RATE], device))
    started = time.perf_counter()   # every corpus file's length: views of one buffer
    for seconds in lengths:
        net.extract(noise[:int(seconds * MODEL_RATE)])
    add(f"model {device} pieces", time.perf_counter() - started)
    clips = [noise[:30 * MODEL_RATE - 97 * i] for i in range(CLIPS_BATCH)]   # one list
    add(f"model {device} clips", time_model(net, clips, device))
    if device == "cuda":
        batch = np.stack([noise[:10 * MODEL_RATE]] * GPU_BATCH)
        add(f"model {device} batch", time_model(net, batch, device))


def launch_counter():
    """A TorchDispatchMode counting, by name, the aten operations that compute: in place, or
    with an output in new memory (views share their input's), or no tensor out (`equal`)."""
    import torch
    from torch.utils import _pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class LaunchCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            storages = {t.untyped_storage().data_ptr()
                        for t in _pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            outs = [t for t in _pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            name = func.overloadpacket.__name__
            if name.endswith("_") or not outs or any(
                    t.untyped_storage().data_ptr() not in storages for t in outs):
                self.ops[name] = self.ops.get(name, 0) + 1
            return out
    return LaunchCounter()


def launch_clips(n=LAUNCH_BATCH, seconds=30):
    """n waveforms of about `seconds`, each 97 samples shorter than the one before."""
    noise = np.random.default_rng(SEED).uniform(-0.5, 0.5, seconds * MODEL_RATE)
    return [noise[:seconds * MODEL_RATE - 97 * i].astype(np.float32) for i in range(n)]


def count_launches(net, clips, host_path: bool) -> tuple:
    """(computing aten operations, operations that wait for the device) of one net.extract of
    the clips (one batch), on the CPU's path or (host_path=False) every other device's."""
    import soundnet
    saved = soundnet.HOST_DEVICES
    soundnet.HOST_DEVICES = saved if host_path else ()
    try:
        net.extract(clips[:1])   # folded weights cached
        counter = launch_counter()
        with counter:
            net.extract(clips, batch_size=len(clips), batch_seconds=1e9)
    finally:
        soundnet.HOST_DEVICES = saved
    return sum(counter.ops.values()), sum(counter.ops.get(name, 0) for name in SYNC_OPS)


def model_costs(nets: dict, add):
    """Section G, once: fidelity of every layer against a float64 run of the plain modules on
    the CPU; launches and waits per batch; the GPU memory peak of a batch."""
    import copy
    import torch
    from soundnet import FEATURES, INPUT_SCALE, LAYERS
    block_outputs = [name for name in FEATURES if name not in ("conv1", "conv2")]   # fused
    wave = launch_clips(1, FIDELITY_S)[0]
    double = copy.deepcopy(nets["cpu"]).double()
    x = torch.from_numpy(wave).double()[None, None] * INPUT_SCALE
    want = {}
    with torch.no_grad():
        for index, module in enumerate(double.features, start=1):
            x = module(x)
            want[LAYERS[index].name] = x[0].T.numpy()
        want["y_obj"], want["y_scns"] = (h(x)[0].T.numpy() for h in (double.conv8, double.conv8_2))
    clips = launch_clips()
    for dev, net in nets.items():
        for path, layers in (("fused", block_outputs), ("inner", list(range(1, 27)))):
            got = net.extract(wave, layers)
            add(f"fidelity {dev} {path}", max(
                np.abs(got[name] - want[name]).max() / np.abs(want[name]).max() for name in got))
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            net.extract(clips, batch_size=len(clips), batch_seconds=1e9)
            add("cuda memory peak", torch.cuda.max_memory_allocated() / 2 ** 20)
    for path, host in (("cpu path", True), ("device path", False)):
        ops, waits = count_launches(nets["cpu"], clips, host)
        add(f"launches {path}", ops)
        add(f"waits {path}", waits)


# -- report -------------------------------------------------------------------------------------

def machine() -> str:
    import torch
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem_gb:.0f} GiB, {platform.system()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}){gpu}")


def table(res: dict, audio_s: float, n_files: int, long_s: float, devices: list,
          clips: dict) -> list:
    med = {k: statistics.median(v) for k, v in res.items()}
    rows = [("measurement", "median", "x-realtime", "runs", "")]

    def row(name, key, seconds=None, unit="s", note=""):
        def fmt(v):
            if unit == "ms":
                return f"{v:.2f}"
            if unit == "of peak":
                return f"{v:.1e}"
            return f"{v:.0f}" if unit != "s" else f"{v:.3f}" if v < 1 else f"{v:.2f}"

        if key in res:
            rows.append((name, f"{fmt(med[key])} {unit}",
                         f"{seconds / med[key]:.0f}x" if seconds else "",
                         " ".join(fmt(v) for v in res[key]), note))

    def ratio(name, key, base, note=""):
        if key in med and base in med:
            rows.append((name, f"{med[key] / med[base]:.2f}", "",
                         " ".join(f"{a / b:.2f}" for a, b in zip(res[key], res[base])), note))

    def bound(prefix, seconds, e2e):
        """The decoders' own bound (model stubbed) and end-to-end against it, per device."""
        row(f"  decoders alone: the same run, model stubbed (--device {devices[-1]})",
            f"{prefix} stub", seconds)
        row("    main thread CPU per file, model excluded", f"{prefix} stub thread ms",
            unit="ms", note="target <= 1 ms per 10 s clip")
        row("    main process CPU per file (with the writer thread)",
            f"{prefix} stub process ms", unit="ms")
        for dev in devices:
            ratio(f"  ratio end-to-end --device {dev} / decoders alone", e2e.format(dev),
                  f"{prefix} stub", "GPU target <= 1.1" if dev == "cuda" else "")

    corpus = f"{audio_s / 3600:.2f} h, {n_files} files"
    for dev in devices:
        row(f"end-to-end extract_feats.py --device {dev} ({corpus})", f"e2e {dev}", audio_s)
        row("  its CPU time, user + sys, all processes", f"e2e {dev} cputime")
        row("  its own timer (from model loaded to done)", f"e2e {dev} inner", audio_s)
    bound("corpus", audio_s, "e2e {}")
    row("decode only, librosa.load sr=22050, 1 process", "decode", audio_s)
    row("  its CPU time, user + sys", "decode cputime")
    row("  the librosa.load loop alone", "decode loop", audio_s)
    if "e2e cpu" in med:
        rows.append(("ratio end-to-end / decode-only (whole processes)",
                     f"{med['e2e cpu'] / med['decode']:.2f}", "",
                     f"vs the loop alone: {med['e2e cpu'] / med['decode loop']:.2f}",
                     "target <= 1.0, aim 0.8"))
    for name, (files, lengths) in clips.items():
        what = f"{name}: {len(files)} files, {sum(lengths) / 3600:.2f} h"
        for dev in devices:
            row(f"{what}, extract_feats.py --device {dev}", f"{name} e2e {dev}", sum(lengths))
        row(f"{what}, extract_feats.py --batch-size 1 (cpu)", f"{name} e2e batch1",
            sum(lengths))
        bound(name, sum(lengths), f"{name} e2e {{}}")
        row(f"{what}, decode only (librosa.load)", f"{name} decode", sum(lengths))
        ratio(f"{name}: ratio end-to-end / decode-only", f"{name} e2e cpu", f"{name} decode",
              "target <= 1.3, aim 1.2" if "10s" in name else "")
        ratio(f"{name}: default / --batch-size 1", f"{name} e2e cpu", f"{name} e2e batch1",
              "target <= 0.71 (1.4x faster)" if "5s" in name else "")
    for dev in devices:
        where = f"{dev}, {MODEL_THREADS} threads" if dev == "cpu" else dev
        for s in MODEL_LENGTHS_S:
            length = f"{s} s" if s < 60 else f"{s // 60} min"
            row(f"model alone {length} ({where})", f"model {dev} {s}", s)
        row(f"model alone {corpus} in pieces ({where})", f"model {dev} pieces", audio_s)
        row(f"model alone {GPU_BATCH} x 10 s batch ({where})", f"model {dev} batch",
            GPU_BATCH * 10)
        row(f"model alone {CLIPS_BATCH} x 30 s (10 s clips tiled) as one list ({where})",
            f"model {dev} clips", CLIPS_BATCH * 30)
        speeds = [s / med[f"model {dev} {s}"] for s in MODEL_LENGTHS_S
                  if f"model {dev} {s}" in med]
        if speeds:
            rows.append((f"model alone ({dev}): slowest / fastest length",
                         f"{min(speeds) / max(speeds):.2f}", "", "",
                         "target >= 1000x, flat within 20% (>= 0.8)"))
    row("extract_feats.py on the 30-min file, wall", "long wall", long_s)
    row("peak RSS extract_feats on 30-min file (tree sum)", "long rss", unit="MB",
        note="target < 1000, aim 600")
    row("  same, PSS (pages shared after fork once)", "long pss", unit="MB")
    row("peak RSS librosa.load on 30-min file, 1 process", "decode long rss", unit="MB")
    row("  its wall", "decode long wall", long_s)
    hour = f"{VIDEO_LONG_S / 3600:g}-hour M4A"
    mp4s, clips_s = f"{VIDEO_CLIPS} MP4 clips of {VIDEO_CLIP_S:g} s", VIDEO_CLIPS * VIDEO_CLIP_S
    row(f"peak RSS extract_feats on a {hour} (tree sum)", "video long rss", unit="MB",
        note="target < 1000, aim 600")
    row("  its wall", "video long wall", VIDEO_LONG_S)
    row(f"peak RSS librosa.load on the {hour}, 1 process", "video long librosa rss", unit="MB")
    row("  its wall", "video long librosa wall", VIDEO_LONG_S)
    row(f"peak RSS soundnet_io.open_audio on the {hour}", "video long ours rss", unit="MB")
    row("  its wall", "video long ours wall", VIDEO_LONG_S)
    row(f"end-to-end extract_feats.py --device cpu ({mp4s})", "video clips e2e", clips_s)
    row("decode only, librosa.load sr=22050, 1 process", "video clips librosa", clips_s)
    row("  the librosa.load loop alone", "video clips librosa loop", clips_s)
    row("decode only, soundnet_io.open_audio, 1 process", "video clips ours", clips_s)
    row("  the open_audio loop alone", "video clips ours loop", clips_s)
    if "video clips e2e" in med:
        rows.append(("ratio end-to-end / librosa.load on the clips (whole processes)",
                     f"{med['video clips e2e'] / med['video clips librosa']:.2f}", "", "",
                     "target <= 1.0"))
    for dev in devices:
        row(f"fidelity ({dev}): worst block output (fused path), max error / peak vs "
            "float64", f"fidelity {dev} fused", unit="of peak", note="target <= 1e-5")
        row(f"fidelity ({dev}): worst of all 26 layers", f"fidelity {dev} inner",
            unit="of peak", note="target <= 1e-5")
    row(f"GPU memory peak, one batch of {LAUNCH_BATCH} x 30 s", "cuda memory peak", unit="MB")
    for path in ("cpu path", "device path"):
        row(f"aten operations per batch of {LAUNCH_BATCH} x 30 s, {path} (on the CPU)",
            f"launches {path}", unit="ops", note="~ kernel launches on a GPU")
        row(f"  of which wait for the device ({', '.join(SYNC_OPS)})", f"waits {path}",
            unit="ops")
    row("CPU used by other processes during a repeat", "other load",
        note="noise: ~0 when the machine was otherwise idle")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    rows.insert(1, tuple("-" * w for w in widths))
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, help="existing folder of audio (walked recursively)")
    p.add_argument("--long", type=Path, help="file for the memory run (default: the generated "
                   "30-min MP3, or the longest file of --corpus)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "soundnet-bench")
    p.add_argument("--hours", type=float, default=1.0, help="size of the generated corpus")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--skip-long", action="store_true", help="no runs on the 30-minute file")
    p.add_argument("--json", type=Path, help="also save the raw numbers here")
    p.add_argument("--only", choices=["clips", "videos"],
                   help="run only the short-clip folders (E) or only the videos (F)")
    p.add_argument("--skip-video", action="store_true", help="no video rows (F)")
    args = p.parse_args(argv)

    videos = None if args.skip_video or args.only == "clips" else generated_videos(args.cache)
    if args.only == "videos":
        if videos is None:
            sys.exit("--only videos needs ffmpeg")
        files, lengths, long_file = [], [], videos[0]
    elif args.corpus:
        files = sorted(f for f in args.corpus.rglob("*") if f.suffix.lower() in AUDIO_EXTS)
        lengths = [duration(f) for f in files]
        long_file = args.long or files[int(np.argmax(lengths))]
    else:
        files, lengths, long_file = generated_corpus(args.cache, args.hours)
        long_file = args.long or long_file
    corpus = args.corpus or (files[0].parent if files else None)
    exts = sorted({f.suffix.lower() for f in files})
    audio_s, long_s = sum(lengths), duration(long_file)
    clips = clip_sets(args.cache) if not args.corpus and args.only != "videos" else {}
    whole = args.only is None

    import torch
    sys.path.insert(0, str(ROOT))
    from soundnet import SoundNet
    devices = ["cpu"]
    if args.device == "cuda" and torch.cuda.is_available():
        devices.append("cuda")
    elif args.device == "cuda":
        print("no CUDA device: GPU rows skipped", file=sys.stderr)
    torch.set_num_threads(MODEL_THREADS)
    nets = {dev: SoundNet.from_pretrained(device=dev) for dev in devices}
    for net in nets.values():   # warm-up: fused weights, allocator, CUDA context
        net.extract(np.zeros(10 * MODEL_RATE, np.float32))

    res = {}

    def add(key, value):
        res.setdefault(key, []).append(value)

    if args.only != "videos":
        model_costs(nets, add)                                                           # G

    decode_cmd, file_list = [sys.executable, "-c", DECODE_SCRIPT], "\n".join(map(str, files))
    with tempfile.TemporaryDirectory(prefix="soundnet-bench-") as tmp:
        long_dir = Path(tmp) / "long"
        long_dir.mkdir()
        (long_dir / long_file.name).symlink_to(long_file.absolute())
        print("warm-up (untimed)", file=sys.stderr)
        if args.only != "videos":
            warm = (corpus, exts) if whole else (clips["clips_5s"][0][0].parent, [".wav"])
            run_timed(extractor_cmd(*warm[:1], Path(tmp) / "warm", warm[1], "cpu"))
        run_timed(decode_cmd, file_list if whole else "")
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
            busy, ours = cpu_seconds()
            for name, (clip_files, _) in clips.items():                                 # E
                folder, clip_exts = clip_files[0].parent, [clip_files[0].suffix]
                for dev, extra in [(dev, ()) for dev in devices] + [("batch1", ("--batch-size", "1"))]:
                    out = Path(tmp) / f"{name}{r}{dev}"
                    run = run_timed(extractor_cmd(folder, out, clip_exts,
                                                  "cpu" if dev == "batch1" else dev, *extra))
                    add(f"{name} e2e {dev}", run["wall"])
                    shutil.rmtree(out)
                stub_run(folder, Path(tmp) / f"{name}{r}stub", clip_exts, devices[-1], add, name)
                add(f"{name} decode", run_timed(decode_cmd, "\n".join(map(str, clip_files)))["wall"])
            for dev, net in nets.items() if args.only != "videos" else []:               # C
                model_runs(net, dev, lengths, add)
            for dev in devices if whole else []:                                         # A
                out = Path(tmp) / f"out{r}{dev}"
                run = run_timed(extractor_cmd(corpus, out, exts, dev))
                add(f"e2e {dev}", run["wall"])
                add(f"e2e {dev} cputime", run["cpu"])
                inner = re.search(r"of audio in ([\d.]+) s", run["stderr"])
                if inner:
                    add(f"e2e {dev} inner", float(inner.group(1)))
                shutil.rmtree(out)
            if whole:
                stub_run(corpus, Path(tmp) / f"stub{r}", exts, devices[-1], add, "corpus")
            if whole:
                run = run_timed(decode_cmd, file_list)                                   # B
                add("decode", run["wall"])
                add("decode cputime", run["cpu"])
                add("decode loop", json.loads(run["stdout"])["loop_s"])
            if whole and not args.skip_long:                                                       # D
                run = run_sampled(extractor_cmd(long_dir, Path(tmp) / f"long{r}",
                                                [long_file.suffix.lower()], "cpu"))
                add("long wall", run["wall"])
                add("long rss", run["rss"])
                add("long pss", run["pss"])
                run = run_sampled(decode_cmd, str(long_file))
                add("decode long wall", run["wall"])
                add("decode long rss", run["rss"])
            if videos:                                                                   # F
                video_runs(videos, Path(tmp), r, add)
            busy_after, ours_after = cpu_seconds()
            add("other load", max(0.0, (busy_after - busy) - (ours_after - ours)))
            print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in res.items()), file=sys.stderr)

    lines = [f"SoundNet benchmark: {machine()}",
             (f"corpus {corpus} ({audio_s / 3600:.2f} h, {len(files)} files); long file "
              f"{long_file} ({long_s / 60:.1f} min); {args.repeats} repeats, interleaved"),
             f"videos {videos[0].parent}" if videos else "no videos", "",
             *table(res, audio_s, len(files), long_s, devices, clips)]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "audio_s": audio_s,
                                         "files": len(files), "long_s": long_s, "runs": res,
                                         "table": lines}, indent=1))


if __name__ == "__main__":
    main()
