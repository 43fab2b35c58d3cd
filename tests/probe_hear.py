"""Which SoundNet layers make good HEAR embeddings (a script that prints figures, not a test).

    python tests/probe_hear.py [--per-class N] [--event-clips N] [--seed S] [--skip WHICH]

Generates labelled synthetic clips (8 sound types with random parameters, in background noise
at a random SNR and gain) and scores linear probes on SoundNet features, as in the paper's
linear-SVM protocol: standardised features, a linear classifier (ridge), 5-fold cross-validated
accuracy. Needs scikit-learn (for this measurement only; not a dependency).

  scene:     one clip -> one mean-pooled vector. Layers conv4 .. conv7, for clips of 0.5, 1 and
             4 s, each as is, zero-padded to TILE_SECONDS, or tiled to TILE_SECONDS (the CLI's
             rule: n samples repeated whole floor(L/n) + 1 times).
  timestamp: 4 s clips with one event (a sound type, 0.3-1.5 s, random onset) in background
             noise; every EVAL_HOP a label (the event's type, or "none"), and the probe reads
             the nearest frame of each candidate layer (group 5-fold by clip). This scores both
             what a layer knows and how precisely its frames are placed in time.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeClassifierCV
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from soundnet import SAMPLE_RATE, SoundNet, get_layer, tile_clip  # noqa: E402

SR = SAMPLE_RATE
TYPES = ("tone", "chirp_up", "chirp_down", "noise_band", "clicks", "am_tone", "harmonic",
         "fm_tone")
SCENE_LAYERS = ("conv4", "conv5", "pool5", "conv6", "conv7")
SCENE_SECONDS = (0.5, 1.0, 4.0)
TILE_SECONDS = 20.0
EVENT_CLIP_SECONDS = 4.0
EVAL_HOP = get_layer("conv4").hop        # samples between timestamp labels (46.4 ms)


def sound(kind: str, n: int, rng) -> np.ndarray:
    """(n,) float64 of one sound type with random parameters, peak 1."""
    t = np.arange(n) / SR
    f = np.exp(rng.uniform(np.log(200), np.log(4000)))
    if kind == "tone":
        x = np.sin(2 * np.pi * f * t)
    elif kind in ("chirp_up", "chirp_down"):
        lo = np.exp(rng.uniform(np.log(200), np.log(800)))
        hi = np.exp(rng.uniform(np.log(2000), np.log(6000)))
        f0, f1 = (lo, hi) if kind == "chirp_up" else (hi, lo)
        x = np.sin(2 * np.pi * np.cumsum(f0 * (f1 / f0) ** (t / t[-1])) / SR)
    elif kind == "noise_band":
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SR)
        spec[np.abs(np.log2(np.maximum(freqs, 1) / f)) > 1 / 6] = 0   # a third of an octave
        x = np.fft.irfft(spec, n)
    elif kind == "clicks":
        x = np.zeros(n)
        x[(np.arange(0, n, SR / rng.uniform(5, 40))).astype(int)] = 1.0
        x = np.convolve(x, np.exp(-np.arange(64) / 8.0) * rng.choice([-1, 1], 64), "same")
    elif kind == "am_tone":
        x = np.sin(2 * np.pi * f * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 30) * t))
    elif kind == "harmonic":
        f0 = rng.uniform(100, 400)
        x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k for k in range(1, 9))
    elif kind == "fm_tone":
        depth, rate = rng.uniform(0.02, 0.1), rng.uniform(3, 12)
        x = np.sin(2 * np.pi * np.cumsum(f * (1 + depth * np.sin(2 * np.pi * rate * t))) / SR)
    else:
        raise ValueError(kind)
    return x / (np.abs(x).max() + 1e-12)


def background(n: int, rng) -> np.ndarray:
    """Pink-ish noise, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / SR), 20))
    x = np.fft.irfft(spec, n)
    return x / x.std()


def scene_clips(per_class: int, seconds: float, rng):
    n = round(seconds * SR)
    waves, labels = [], []
    for label, kind in enumerate(TYPES):
        for _ in range(per_class):
            x = sound(kind, n, rng)
            snr_db = rng.uniform(0, 20)
            x = x / x.std() + background(n, rng) * 10 ** (-snr_db / 20)
            waves.append(rng.uniform(0.1, 0.9) * x / np.abs(x).max())
            labels.append(label)
    return np.stack(waves).astype(np.float32), np.array(labels)


def event_clips(n_clips: int, rng):
    """4 s clips, one event each; returns waves (N, T) and event (label, start, end) samples."""
    n = round(EVENT_CLIP_SECONDS * SR)
    waves, events = [], []
    for i in range(n_clips):
        label = i % len(TYPES)
        length = round(rng.uniform(0.3, 1.5) * SR)
        start = rng.integers(0, n - length)
        x = background(n, rng) * 0.1
        x[start:start + length] += sound(TYPES[label], length, rng) * np.hanning(length) ** 0.1 \
            * 10 ** (rng.uniform(-10, 10) / 20) * 0.3
        waves.append(rng.uniform(0.1, 0.9) * x / np.abs(x).max())
        events.append((label, start, start + length))
    return np.stack(waves).astype(np.float32), events


def extend(waves: np.ndarray, how: str) -> np.ndarray:
    n = waves.shape[1]
    total = round(TILE_SECONDS * SR)
    if how == "as is" or n >= total:
        return waves
    if how == "zero-pad":
        return np.pad(waves, ((0, 0), (0, total - n)))
    return tile_clip(waves, TILE_SECONDS)                 # "tile", the CLI's rule


def features(net, waves: np.ndarray, layers, batch: int = 32) -> dict:
    out = {name: [] for name in layers}
    for i in range(0, len(waves), batch):
        for name, x in net.extract(torch.from_numpy(waves[i:i + batch]), layers).items():
            out[name].append(x)
    return {name: torch.cat(x).numpy() for name, x in out.items()}


def probe(x, y, groups=None) -> float:
    # Ridge (one-vs-rest least squares, regularisation by efficient leave-one-out): a linear
    # probe in closed form; logistic regression took minutes per fit on this shared machine.
    clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(0, 4, 5)))
    cv = GroupKFold(5) if groups is not None else StratifiedKFold(5, shuffle=True, random_state=0)
    scoring = "balanced_accuracy" if groups is not None else "accuracy"
    return cross_val_score(clf, x, y, cv=cv, groups=groups, scoring=scoring).mean()


def scene_probe(net, per_class: int, rng):
    print(f"scene: {len(TYPES)} types x {per_class} clips, mean-pooled, 5-fold accuracy")
    print(f"{'clip':>6} {'handling':>9} " + " ".join(f"{n:>7}" for n in SCENE_LAYERS))
    for seconds in SCENE_SECONDS:
        waves, labels = scene_clips(per_class, seconds, rng)
        for how in ("as is", "zero-pad", "tile"):
            if seconds >= TILE_SECONDS and how != "as is":
                continue
            feats = features(net, extend(waves, how), SCENE_LAYERS)
            scores = [probe(feats[n].mean(axis=1), labels) for n in SCENE_LAYERS]
            print(f"{seconds:>5}s {how:>9} " + " ".join(f"{s:7.3f}" for s in scores), flush=True)


def nearest_frames(layer_name: str, frames: np.ndarray, times: np.ndarray) -> np.ndarray:
    """frames (N, F, C) of a layer -> (N, len(times), C): the frame centred nearest each time."""
    centres = get_layer(layer_name).timestamps(frames.shape[1])
    idx = np.abs(centres[None, :] - times[:, None]).argmin(axis=1)
    return frames[:, idx]


def timestamp_probe(net, n_clips: int, rng):
    waves, events = event_clips(n_clips, rng)
    n = waves.shape[1]
    n_eval = n // EVAL_HOP
    times = (np.arange(n_eval) + 0.5) * EVAL_HOP / SR               # seconds
    labels = np.array([[lab + 1 if s <= t * SR < e else 0 for t in times] for lab, s, e in events])
    feats = features(net, waves, ("conv3", "conv4", "conv5", "pool5", "conv6"))
    near = {name: nearest_frames(name, x, times) for name, x in feats.items()}
    candidates = {
        "conv3": ["conv3"], "conv4": ["conv4"], "conv5": ["conv5"], "pool5": ["pool5"],
        "conv6": ["conv6"], "conv4+conv5": ["conv4", "conv5"], "conv4+pool5": ["conv4", "pool5"],
        "conv5+pool5": ["conv5", "pool5"], "conv4+conv5+pool5": ["conv4", "conv5", "pool5"],
    }
    groups = np.repeat(np.arange(n_clips), n_eval)
    print(f"\ntimestamp: {n_clips} clips of {EVENT_CLIP_SECONDS} s, {n_eval} labels each "
          f"({EVAL_HOP / SR * 1000:.1f} ms apart), 9 classes (8 types + none), "
          f"balanced accuracy, chance {1 / 9:.3f}")
    for name, parts in candidates.items():
        x = np.concatenate([near[p] for p in parts], axis=2).reshape(-1, sum(
            near[p].shape[2] for p in parts))
        print(f"  {name:>18} ({x.shape[1]:4d} dims): {probe(x, labels.ravel(), groups):.3f}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--event-clips", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=("scene", "timestamp"))
    args = parser.parse_args()
    started = time.perf_counter()
    net = SoundNet.from_pretrained()
    if args.skip != "scene":
        scene_probe(net, args.per_class, np.random.default_rng(args.seed))
    if args.skip != "timestamp":
        timestamp_probe(net, args.event_clips, np.random.default_rng(args.seed + 1))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
