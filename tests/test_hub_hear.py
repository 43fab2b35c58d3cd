"""torch.hub entry point (hubconf.py) and the HEAR 2021 API (soundnet_hear.py)."""
import numpy as np
import pytest
import torch

import soundnet_hear as hear
from conftest import ROOT, tone
from soundnet import SAMPLE_RATE, SoundNet, get_layer


# ---------------------------------------------------------------------------------------------
# torch.hub
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def github_copy(monkeypatch):
    """torch.hub's GitHub path with this checkout standing in for its downloaded copy (list and
    help take only a GitHub repository; the tests have no network)."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(ROOT))
    return "OWNER/soundnet_pytorch"


def test_hub_lists_and_documents_the_entry_point(github_copy):
    assert torch.hub.list(github_copy) == ["soundnet"]
    doc = torch.hub.help(github_copy, "soundnet")
    assert "pretrained=True" in doc and "sha256" in doc


def test_hub_load_from_github_copy(github_copy, net):
    loaded = torch.hub.load(github_copy, "soundnet", trust_repo=True)
    assert loaded.weights_sha256 == net.weights_sha256


def test_hub_load_gives_the_pretrained_network(net):
    loaded = torch.hub.load(str(ROOT), "soundnet", source="local")
    assert isinstance(loaded, SoundNet) and not loaded.training
    assert loaded.weights_sha256 == net.weights_sha256
    expected = net.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_hub_load_untrained():
    untrained = torch.hub.load(str(ROOT), "soundnet", source="local", pretrained=False)
    assert isinstance(untrained, SoundNet) and untrained.weights_sha256 is None
    assert untrained(torch.zeros(1, 4574), ["pool5"])["pool5"].shape == (1, 256, 1)
    with pytest.raises(TypeError, match="device="):
        torch.hub.load(str(ROOT), "soundnet", source="local", pretrained=False, path="x.npy")


# ---------------------------------------------------------------------------------------------
# HEAR: what hear-validator checks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(net):
    return hear.SoundNetHEAR(net)


def noise(n_sounds, seconds, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n_sounds, int(seconds * SAMPLE_RATE), generator=generator) * 2 - 1


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 22050
    assert type(model.scene_embedding_size) is int and model.scene_embedding_size > 0
    assert type(model.timestamp_embedding_size) is int and model.timestamp_embedding_size > 0


def test_load_model_default_and_from_file(net):
    for loaded in (hear.load_model(), hear.load_model(str(ROOT / "models" / "sound8.npy"))):
        assert loaded.net.weights_sha256 == net.weights_sha256
    with pytest.raises(FileNotFoundError, match="no-such.npy"):
        hear.load_model(str(ROOT / "models" / "no-such.npy"))
    assert not (ROOT / "models" / "no-such.npy").exists()


def check_timestamp_output(model, audio):
    """hear-validator's checks, plus dtype and device."""
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    n_sounds, n_samples = audio.shape
    assert embeddings.dtype == torch.float32 and embeddings.device == audio.device
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[0] == n_sounds
    assert embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == model.timestamp_embedding_size
    assert not embeddings.requires_grad and not embeddings.is_inference()
    assert torch.isfinite(embeddings).all()
    ms = timestamps.numpy().astype(np.float64)
    duration_ms = 1000 * n_samples / SAMPLE_RATE
    if ms.shape[1] > 1:
        step = np.diff(ms, axis=1)
        assert np.abs(step - step.mean()).max() < 1, "timestamps not evenly spaced"
        assert step.mean() <= 50, "HEAR suggests at most 50 ms between timestamps"
        assert ms.min() <= step.mean()
        assert ms.max() >= duration_ms - 2 * step.mean()
    assert 0 <= ms.min() and ms.max() <= duration_ms
    return embeddings, timestamps


def check_scene_output(model, audio):
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.dtype == torch.float32 and scene.device == audio.device
    assert scene.shape == (len(audio), model.scene_embedding_size)
    assert not scene.requires_grad and torch.isfinite(scene).all()
    return scene


def test_validator_batch_of_16_two_second_noise_clips(model):
    check_timestamp_output(model, noise(16, 2.0))
    check_scene_output(model, noise(16, 2.0))


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_validator_timestamp_lengths(model, seconds):
    check_timestamp_output(model, noise(2, seconds))


def test_validator_scene_length(model):
    check_scene_output(model, noise(4, 2.74))


# ---------------------------------------------------------------------------------------------
# HEAR: lengths, batching, geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds", [0.5, 1.0, 60.0])
def test_clip_lengths(model, seconds):
    audio = torch.from_numpy(np.stack([tone(seconds, seed=s) for s in range(2)]))
    embeddings, _ = check_timestamp_output(model, audio)
    scene = check_scene_output(model, audio)
    assert not torch.equal(scene[0], scene[1]) and not torch.equal(embeddings[0], embeddings[1])


def test_shortest_clips(model):
    # Shorter than pool5's receptive field: padded so every layer has a frame.
    check_timestamp_output(model, noise(2, 0.05))
    check_scene_output(model, noise(2, 0.01))
    with pytest.raises(ValueError, match="too short for a timestamp embedding"):
        hear.get_timestamp_embeddings(noise(1, 0.001), model)
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(noise(1, 1.0)[0], model)


def test_batch_equals_one_clip_at_a_time(model):
    audio = torch.from_numpy(np.stack([tone(1.5, seed=s) for s in range(3)]))
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    scene = hear.get_scene_embeddings(audio, model)
    for i in range(len(audio)):
        one_emb, one_ts = hear.get_timestamp_embeddings(audio[i:i + 1], model)
        torch.testing.assert_close(one_emb[0], embeddings[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(one_ts[0], timestamps[i])
        one_scene = hear.get_scene_embeddings(audio[i:i + 1], model)
        torch.testing.assert_close(one_scene[0], scene[i], rtol=1e-5, atol=1e-5)


def test_timestamps_follow_the_layer_geometry(model, net):
    n_samples = 3 * SAMPLE_RATE
    wave = tone(3.0)
    embeddings, timestamps = hear.get_timestamp_embeddings(torch.from_numpy(wave[None]), model)
    first = get_layer(hear.TIMESTAMP_LAYERS[0])
    assert np.isclose(np.diff(timestamps[0].numpy()).mean(), 1000 * first.hop / SAMPLE_RATE,
                      atol=1e-3)
    # Each embedding is the frame of each layer centred nearest its timestamp, in that order.
    feats = net.extract(wave, hear.TIMESTAMP_LAYERS)
    start = 0
    for name in hear.TIMESTAMP_LAYERS:
        layer = get_layer(name)
        centres_ms = 1000 * layer.timestamps(layer.n_frames(n_samples))
        for t, row in zip(timestamps[0].numpy(), embeddings[0].numpy()):
            k = np.abs(centres_ms - t).argmin()
            if t <= centres_ms[-1]:      # pool5's last frame can end before the clip does
                assert abs(centres_ms[k] - t) <= 1000 * layer.hop_seconds / 2 + 1e-3
            np.testing.assert_array_equal(row[start:start + layer.channels], feats[name][k])
        start += layer.channels
    assert start == model.timestamp_embedding_size


def test_scene_embedding_is_the_layer_mean_of_the_tiled_clip(model, net):
    wave = tone(1.0)
    scene = hear.get_scene_embeddings(torch.from_numpy(wave[None]), model)[0]
    min_samples = round(hear.SCENE_MIN_SECONDS * SAMPLE_RATE)
    tiled = np.tile(wave, min_samples // len(wave) + 1)
    expected = net.extract(tiled, [hear.SCENE_LAYER])[hear.SCENE_LAYER].mean(axis=0)
    np.testing.assert_allclose(scene.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_no_autograd_even_when_enabled(model):
    audio = noise(1, 1.0).requires_grad_()
    with torch.enable_grad():
        embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
        scene = hear.get_scene_embeddings(audio, model)
    assert not (embeddings.requires_grad or timestamps.requires_grad or scene.requires_grad)
