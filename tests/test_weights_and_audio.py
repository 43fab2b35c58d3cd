"""Loading sound8.npy safely, and decoding audio files."""
import hashlib
import os
import pickle

import numpy as np
import pytest
import soundfile as sf

import soundnet
from conftest import tone
from soundnet import (WEIGHTS_PATH, WEIGHTS_SHA256, AudioError, SoundNet, WeightsError,
                      load_audio, load_weights, open_audio)


# -- weights -------------------------------------------------------------------------------------

def test_real_weights_are_cached_and_verified(net):
    assert WEIGHTS_PATH.exists()
    assert hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest() == WEIGHTS_SHA256


def test_truncated_file_is_refused(tmp_path):
    bad = tmp_path / "sound8.npy"
    bad.write_bytes(WEIGHTS_PATH.read_bytes()[:1_000_000])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(bad)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "sound8.npy"
    # padded to the size of real weights, which alone reach the unpickler
    payload = np.empty(2, dtype=object)
    payload[:] = [RunsCode(marker), bytes(soundnet.WEIGHTS_BYTES)]
    np.save(evil, payload, allow_pickle=True)
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        load_weights(evil)
    assert not marker.exists()
    # the same payload does run through a plain unpickler: the test would catch a regression
    with open(evil, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        pickle.load(f)
    assert marker.exists()


@pytest.fixture(scope="module")
def real_weights():
    return load_weights(WEIGHTS_PATH)[0]


def save_weights(path, weights):
    np.save(path, np.array(weights, dtype=object), allow_pickle=True)
    return path


def test_wrong_shape_names_the_key(tmp_path, real_weights, net):
    weights = {k: dict(v) for k, v in real_weights.items()}
    weights["conv3"]["weights"] = weights["conv3"]["weights"][:8]
    path = save_weights(tmp_path / "w.npy", weights)
    with pytest.raises(WeightsError, match=r"conv3\.weights has shape \(8, 1, 32, 64\), "
                                           r"expected \(16, 1, 32, 64\)"):
        load_weights(path)
    weights["conv3"] = real_weights["conv3"]
    del weights["conv8_2"]
    with pytest.raises(WeightsError, match=r"missing conv8_2\.weights"):
        load_weights(save_weights(path, weights))
    with pytest.raises(WeightsError, match="expected a dict"):   # of the right size
        load_weights(save_weights(path, list(real_weights.values())))


def test_other_well_formed_weights_load_with_a_warning(tmp_path, real_weights):
    weights = {k: dict(v) for k, v in real_weights.items()}
    weights["conv1"]["biases"] = weights["conv1"]["biases"] + 1
    path = save_weights(tmp_path / "finetuned.npy", weights)
    with pytest.warns(UserWarning, match="is not that of the published sound8.npy"):
        model = SoundNet.from_pretrained(path)
    np.testing.assert_allclose(model.features[0].bias.detach().numpy(),
                               weights["conv1"]["biases"])


def test_failed_download_explains_how_to_place_the_file(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version (network unreachable)"

    monkeypatch.setattr(soundnet.subprocess, "run", lambda *a, **k: Failed())
    target = tmp_path / "models" / "sound8.npy"
    monkeypatch.setattr(soundnet, "WEIGHTS_PATH", target)   # only the default is fetched
    with pytest.raises(WeightsError, match=f"network unreachable.*place it at {target}"):
        SoundNet.from_pretrained(target)
    assert not target.exists()


# -- audio ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
@pytest.mark.parametrize("rate", [22050, 44100, 48000])
def test_formats_and_rates_decode_to_mono_22050(tmp_path, ext, rate):
    path = tmp_path / f"clip.{ext}"
    sf.write(path, tone(3, sr=rate, channels=2), rate)
    info, blocks = open_audio(path)
    assert (info.sample_rate, info.channels) == (rate, 2)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    # MP3 adds encoder delay/padding; the others keep the length exactly
    expected = 3 * 22050
    assert abs(len(wave) - expected) <= (3000 if ext == "mp3" else 1)


def test_resampled_audio_equals_librosa(tmp_path):
    import librosa
    path = tmp_path / "clip.wav"
    sf.write(path, tone(5, sr=44100, channels=2), 44100)
    want, _ = librosa.load(path, sr=22050)
    np.testing.assert_allclose(load_audio(path), want, atol=1e-6)


def test_streaming_blocks_equal_whole_file(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, tone(7, sr=48000, channels=2), 48000)
    whole = load_audio(path)
    _, blocks = open_audio(path, block_seconds=0.37)
    np.testing.assert_allclose(np.concatenate(list(blocks)), whole, atol=1e-6)


def test_channel_policies(tmp_path):
    stereo = tone(2, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 22050, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), stereo.mean(1), atol=1e-7)
    np.testing.assert_array_equal(load_audio(path, channel="first"), stereo[:, 0])
    with pytest.raises(ValueError, match="channel"):
        load_audio(path, channel="left")


def test_values_beyond_full_scale_are_kept(tmp_path, net):
    path = tmp_path / "hot.wav"
    sf.write(path, tone(10, peak=1.2), 22050, subtype="FLOAT")
    wave = load_audio(path)
    assert np.abs(wave).max() == pytest.approx(1.2, rel=1e-6)
    assert np.isfinite(net.extract(wave, ["conv7"])["conv7"]).all()


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)), "not an audio file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(200)), "corrupt MP3"),
])
def test_unreadable_files_raise_audio_error_naming_file_and_cause(tmp_path, make, reason):
    path = tmp_path / "bad file.mp3"
    make(path)
    with pytest.raises(AudioError, match=reason) as error:
        load_audio(path)
    assert str(path) in str(error.value)


def test_zero_samples_is_an_error(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 22050)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(path)
