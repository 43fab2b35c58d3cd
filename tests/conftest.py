import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soundnet import SoundNet  # noqa: E402


@pytest.fixture(scope="session")
def net():
    """The pretrained network; the first run fetches models/sound8.npy."""
    return SoundNet.from_pretrained()


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
