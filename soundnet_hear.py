"""SoundNet-8 behind the HEAR 2021 common API (Holistic Evaluation of Audio Representations).

    import soundnet_hear as hear
    model = hear.load_model()                                  # the published weights
    emb, ts = hear.get_timestamp_embeddings(audio, model)      # audio: (n_sounds, n_samples)
    scene = hear.get_scene_embeddings(audio, model)            # float32 in [-1, 1], 22050 Hz

Timestamp embeddings: TIMESTAMP_LAYERS, one vector per frame of the first layer (conv4: a hop of
1024 samples, 46.4 ms) whose centre lies inside the clip; a later layer contributes its frame
centred nearest that time. Scene embeddings: SCENE_LAYER averaged over its frames, a clip shorter
than SCENE_MIN_SECONDS first tiled to that length. docs/hear.md gives the probe results these
choices rest on (tests/probe_hear.py).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from soundnet import SAMPLE_RATE, WEIGHTS_PATH, SoundNet, get_layer, tile_clip
from soundnet_io import MIN_SECONDS

TIMESTAMP_LAYERS = ("conv4", "pool5")
SCENE_LAYER = "pool5"
SCENE_MIN_SECONDS = MIN_SECONDS   # shorter clips are tiled to this, as extract_feats.py does


class SoundNetHEAR(nn.Module):
    """The pretrained network with the attributes the HEAR API reads."""
    sample_rate = SAMPLE_RATE
    scene_embedding_size = get_layer(SCENE_LAYER).channels
    timestamp_embedding_size = sum(get_layer(name).channels for name in TIMESTAMP_LAYERS)

    def __init__(self, net: SoundNet):
        super().__init__()
        self.net = net
        self.eval()


def load_model(model_file_path: str = "") -> SoundNetHEAR:
    """"": the published sound8.npy (fetched and verified on first use); otherwise a weights
    file of the same format (e.g. fine-tuned), which must exist: from_pretrained would fetch
    the published weights into a mistyped path."""
    if model_file_path and not Path(model_file_path).is_file():
        raise FileNotFoundError(f"{model_file_path}: no such weights file")
    return SoundNetHEAR(SoundNet.from_pretrained(model_file_path or WEIGHTS_PATH))


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: SoundNetHEAR) -> tuple:
    """audio: (n_sounds, n_samples) in [-1, 1] at 22050 Hz.
    Returns embeddings (n_sounds, n_timestamps, model.timestamp_embedding_size) float32 and
    timestamps (n_sounds, n_timestamps) float32, the centre of each frame in milliseconds from
    the clip's start, TIMESTAMP_LAYERS[0]'s hop apart; both on audio's device."""
    audio = _check_audio(audio)
    n_samples = audio.shape[1]
    layers = [get_layer(name) for name in TIMESTAMP_LAYERS]
    centres = layers[0].timestamps(layers[0].n_frames(n_samples))
    # Frames centred in the zero padding around the clip describe no real position in it.
    centres = centres[(centres >= 0) & (centres <= n_samples / SAMPLE_RATE)]
    if len(centres) == 0:
        raise ValueError(f"a clip of {n_samples} samples is too short for a timestamp embedding: "
                         f"no {layers[0].name} frame is centred inside it")
    feats = model.net.extract(_pad_to(audio, max(layer.min_samples for layer in layers)),
                              TIMESTAMP_LAYERS)
    parts = []
    for layer in layers:
        frames = feats[layer.name]
        nearest = np.abs(layer.timestamps(frames.shape[1])[None, :] - centres[:, None]).argmin(1)
        parts.append(frames[:, torch.from_numpy(nearest).to(frames.device)])
    embeddings = torch.cat(parts, dim=2).to(audio.device)
    # Converted by numpy: a float64 tensor cannot exist on MPS.
    timestamps = torch.from_numpy((centres * 1000).astype(np.float32)).to(audio.device)
    return embeddings, timestamps.expand(len(audio), -1).clone()


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: SoundNetHEAR) -> torch.Tensor:
    """audio: (n_sounds, n_samples) in [-1, 1] at 22050 Hz.
    Returns (n_sounds, model.scene_embedding_size) float32 on audio's device: SCENE_LAYER
    averaged over time, a clip shorter than SCENE_MIN_SECONDS tiled to that length first."""
    audio = _check_audio(audio)
    # tile_clip's rule applied to sample indices: one rule, and the audio stays on its device.
    index = torch.from_numpy(tile_clip(np.arange(audio.shape[1]), SCENE_MIN_SECONDS))
    frames = model.net.extract(audio[:, index.to(audio.device)], [SCENE_LAYER])[SCENE_LAYER]
    return frames.mean(dim=1).to(audio.device)


def _check_audio(audio) -> torch.Tensor:
    if not isinstance(audio, torch.Tensor) or audio.ndim != 2 or audio.shape[1] == 0:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise ValueError(f"HEAR audio must be a tensor (n_sounds, n_samples), got {shape}")
    return audio


def _pad_to(audio: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Zero-pad at the end to at least n_samples, so that every layer gives a frame."""
    short = n_samples - audio.shape[1]
    return torch.nn.functional.pad(audio, (0, short)) if short > 0 else audio
