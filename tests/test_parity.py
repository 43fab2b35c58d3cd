"""Parity with the earlier PyTorch port: its audio is librosa.load(path, sr=22050) (values and
length) and it tiles a clip of n < L = 441,000 samples whole int(L / n + 1) times."""
import itertools
import json

import librosa
import numpy as np
import pytest
import soundfile as sf

import extract_feats
import soundnet
from soundnet import load_audio, open_audio, tile_clip

RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]
FORMATS = ["wav", "flac", "ogg", "mp3"]
L = 20 * 22050   # the earlier port's load_size


def noise(n, channels, seed):
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((n, channels))).astype(np.float32)


def earlier_port_input(path):
    """The earlier port's network input, built as it did: librosa.load, then np.tile."""
    wave, _ = librosa.load(path, sr=22050, mono=True)
    if len(wave) < L:
        wave = np.tile(wave, int(L / len(wave) + 1))
    return wave


@pytest.mark.parametrize("rate, fmt", [(r, f) for r, f in itertools.product(RATES, FORMATS)
                                       if not (f == "mp3" and r > 48000)])   # MP3 tops at 48k
def test_load_audio_equals_librosa_load(tmp_path, rate, fmt):
    # lengths that do and do not divide evenly into 22050 Hz, mono and stereo
    for i, (n, channels) in enumerate([(rate, 1), (rate // 3 + 7, 2)]):
        path = tmp_path / f"clip{i}.{fmt}"
        sf.write(path, noise(n, channels, seed=rate + i), rate)
        want, _ = librosa.load(path, sr=22050)
        got = load_audio(path)
        assert got.dtype == np.float32 and len(got) == len(want), (path.name, len(got), len(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
        _, blocks = open_audio(path, block_seconds=0.0731)   # streamed in small blocks
        np.testing.assert_allclose(np.concatenate(list(blocks)), got, rtol=0, atol=1e-6)


def test_resampled_length_is_librosas_for_many_lengths(tmp_path):
    for rate, n in itertools.product([16000, 44100, 48000], [1, 2, 3, 999, 1000, 1001, 44101]):
        path = tmp_path / f"c{rate}_{n}.wav"
        sf.write(path, noise(n, 1, seed=n), rate)
        assert len(load_audio(path)) == len(librosa.load(path, sr=22050)[0]), (rate, n)


def test_tile_clip_is_the_earlier_ports_rule():
    for n in [1, 1000, 5 * 22050, 10 * 22050, L - 1, L, L + 1]:
        wave = np.arange(n, dtype=np.float32)
        tiled = tile_clip(wave)
        reps = int(L / n + 1) if n < L else 1
        np.testing.assert_array_equal(tiled, np.tile(wave, reps))
    assert len(tile_clip(np.ones(5 * 22050, np.float32))) == 25 * 22050
    assert len(tile_clip(np.ones(10 * 22050, np.float32))) == 30 * 22050
    assert len(tile_clip(np.ones(6 * 22050, np.float32))) == 24 * 22050
    assert len(tile_clip(np.ones(100, np.float32), 0)) == 100   # 0 turns tiling off
    assert len(tile_clip(np.ones(100, np.float32), 0.01)) == 300   # L = round(0.01 * 22050) = 220


# (name, seconds or samples at 22050 Hz, rate, channels)
CLIPS = [(f"exact/{s}s{d:+d}.wav", s * 22050 + d, 22050, 1) for s in (5, 10, 20) for d in (-1, 0, 1)]
CLIPS += [("short/blip.wav", int(0.05 * 22050), 22050, 1),
          ("rates/a.wav", 5 * 44100, 44100, 2), ("rates/b.flac", 5 * 48000 + 17, 48000, 1),
          ("rates/c.mp3", int(4.9 * 48000), 48000, 2), ("rates/d.ogg", int(8.5 * 44100), 44100, 1)]


def test_extract_feats_writes_the_earlier_ports_arrays(tmp_path, net):
    root = tmp_path / "in"
    for i, (name, n, rate, channels) in enumerate(CLIPS):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, noise(n, channels, seed=i) * np.hanning(n)[:, None].astype(np.float32),
                 rate)
    out = tmp_path / "out"
    assert extract_feats.main(["-i", str(root), "-o", str(out), "-f", ".wav", ".flac", ".mp3",
                               ".ogg", "--quiet", "--workers", "0"]) == 0
    features = list(soundnet.DEFAULT_FEATURES)
    for name, *_ in CLIPS:
        key = name.rsplit(".", 1)[0]
        reference = earlier_port_input(root / name)
        want = net.extract(reference, features)
        for feature in features:
            got = np.load(out / feature / f"{key}.npy", allow_pickle=False)
            assert got.shape == want[feature].shape, (name, feature)
            np.testing.assert_allclose(got, want[feature], rtol=0,
                                       atol=1e-4 * np.abs(want[feature]).max())
    # the frame counts the issue names: a 5 s clip is tiled to 25 s, a 10 s clip to 30 s
    assert len(np.load(out / "y_scns" / "exact/5s+0.npy")) == 6
    assert len(np.load(out / "conv7" / "exact/5s+0.npy")) == 18
    meta = json.loads((out / "soundnet.json").read_text())
    assert meta["min_seconds"] == 20 and "floor(L / n) + 1" in meta["tiling"]
