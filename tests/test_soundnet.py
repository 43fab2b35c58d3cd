"""The network: fidelity to an independent implementation on every layer, geometry, the
inference path against the plain modules, and the API around them."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tone
from soundnet import (FEATURES, LAYERS, SAMPLE_RATE, SoundNet, get_layer, load_categories,
                      top_labels)

GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_INFO = json.loads((GOLDEN / "golden.json").read_text())
TOLERANCE = 3e-5   # of the layer's peak |value|: what float32 can reach against float64
ALL_LAYERS = list(range(1, 27))


def golden_wave(name):
    samples, rate = sf.read(GOLDEN / f"{name}.flac", dtype="int16")
    assert rate == SAMPLE_RATE
    return samples.astype(np.float32) / 32768   # the network scales by 256 itself


@pytest.fixture(scope="module", params=sorted(GOLDEN_INFO["inputs"]))
def golden(request, net):
    name = request.param
    wave = golden_wave(name)
    plain = {k: v[0].T.detach().cpu().double().numpy() for k, v in net(wave, ALL_LAYERS).items()}
    fast = {k: v.astype(np.float64) for k, v in net.extract(wave, ALL_LAYERS).items()}
    return name, np.load(GOLDEN / f"{name}.npz"), plain, fast


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_every_layer_matches_the_reference(golden, path):
    name, stored, plain, fast = golden
    ours_by_name = plain if path == "plain" else fast
    for index in ALL_LAYERS:
        key = f"L{index:02d}"
        info = GOLDEN_INFO["inputs"][name]["layers"][key]
        assert info["name"] == GOLDEN_INFO["layer_index"][str(index)]
        ours = ours_by_name[LAYERS[index].name]                      # (T, C)
        assert ours.shape == tuple(info["shape"][::-1]), (name, index)
        assert LAYERS[index].n_frames(GOLDEN_INFO["inputs"][name]["samples"]) == ours.shape[0]
        peak = np.abs(ours).max()
        if key in stored.files:
            pairs = [(ours, stored[key].T)]
        else:
            head, tail = stored[key + "_head"].T, stored[key + "_tail"].T
            pairs = [(ours[:len(head)], head), (ours[-len(tail):], tail)]
        for got, want in pairs:
            error = np.abs(got - want).max() / peak
            assert error < TOLERANCE, f"{name} layer {index} ({info['name']}): {error:.2e} of peak"
        assert abs(ours.sum() - info["sum"]) <= 1e-5 * np.abs(ours).sum(), (name, index)
        assert abs((ours ** 2).sum() - info["sumsq"]) <= 1e-5 * info["sumsq"], (name, index)


def test_fused_blocks_match_plain_modules(golden, net):
    """Requesting only block outputs runs every block as one fused GEMM; requesting inner
    layers (above) runs those blocks module by module. Both must agree with the plain modules."""
    name, _, plain, _ = golden
    fused = net.extract(golden_wave(name), list(FEATURES))
    for feature, ours in fused.items():
        want = plain[feature]
        assert ours.shape == want.shape
        assert np.abs(ours - want).max() <= TOLERANCE * np.abs(want).max(), feature


def test_feature_names():
    assert {name: get_layer(name).index for name in FEATURES} == FEATURES
    assert get_layer(22).name == "conv7.conv" and get_layer("22").index == 22
    assert get_layer("conv7.conv").index == 22
    assert get_layer(24).name == "conv7"
    with pytest.raises(ValueError, match="unknown SoundNet layer 'conv9'"):
        get_layer("conv9")
    with pytest.raises(ValueError, match="unknown"):
        get_layer(27)


# -- geometry -----------------------------------------------------------------------------------

def lengths_to_check():
    """Every layer's minimum and its neighbours, hop multiples +-1, and random lengths up to a
    few minutes."""
    rng = np.random.default_rng(0)
    lengths = {1, 2, 13, 14, 15}
    for layer in LAYERS.values():
        lengths |= {layer.min_samples - 1, layer.min_samples, layer.min_samples + 1}
        lengths |= {k * layer.hop + d for k in (7, 8) for d in (-1, 0, 1)}
    lengths |= set(rng.integers(209_374, 4 * 60 * SAMPLE_RATE, 150).tolist())
    return sorted(n for n in lengths if n > 0)


def test_frame_counts_and_minimum_lengths_match_the_modules():
    """Shapes from the real modules (on the meta device: shapes without arithmetic)."""
    meta = SoundNet().to("meta").eval()
    for n in lengths_to_check():
        computable = [layer for layer in LAYERS.values() if n >= layer.min_samples]
        for layer in LAYERS.values():
            assert (layer.n_frames(n) >= 1) == (n >= layer.min_samples), (layer.name, n)
        out = meta(torch.zeros(n, device="meta"), [layer.index for layer in computable])
        for layer in computable:
            assert out[layer.name].shape[-1] == layer.n_frames(n), (layer.name, n)


def test_every_layer_fails_just_below_its_minimum(net):
    for layer in LAYERS.values():
        if layer.min_samples > 1:
            with pytest.raises(ValueError, match=f"at least {layer.min_samples} samples"):
                net.extract(np.zeros(layer.min_samples - 1, np.float32), [layer.index])
            frames = net.extract(np.zeros(layer.min_samples, np.float32), [layer.index])
            assert len(frames[layer.name]) == 1


@pytest.mark.parametrize("index", [1, 4, 8, 9, 12, 15, 18, 19, 22, 25])
def test_receptive_field_and_timestamps_match_an_impulse(net, index):
    """An impulse at sample s changes only the frames whose receptive field holds s (and does
    change the frame centred nearest to it): checks hop, receptive field and offset, hence
    timestamps, against the modules themselves."""
    layer = LAYERS[index]
    n = max(layer.min_samples, 8 * layer.hop) + 3 * layer.receptive_field
    base = tone(n / SAMPLE_RATE + 1, seed=3)[:n] * 0.1
    s = n // 2 + 7
    kick = base.copy()
    kick[s] += 0.9
    before, after = (net(w, [index])[layer.name][0].detach().cpu().numpy() for w in (base, kick))
    changed = np.flatnonzero(np.abs(after - before).max(axis=0) > 1e-6 * np.abs(before).max())
    starts = layer.offset + np.arange(before.shape[1]) * layer.hop
    inside = np.flatnonzero((starts <= s) & (s < starts + layer.receptive_field))
    assert set(changed) <= set(inside), layer.name
    centres = layer.timestamps(before.shape[1])
    assert np.argmin(np.abs(centres - s / SAMPLE_RATE)) in changed
    np.testing.assert_allclose(net.timestamps(layer.name, 3),
                               layer.first_centre_seconds + np.arange(3) * layer.hop_seconds)


def test_published_geometry():
    assert LAYERS[25].min_samples == 209_374                  # conv8: 9.5 s
    assert LAYERS[24].hop == 32768 and LAYERS[18].hop == 8192
    assert [LAYERS[i].channels for i in (3, 7, 11, 14, 17, 21, 24, 25, 26)] == \
        [16, 32, 64, 128, 256, 512, 1024, 1000, 401]


# -- the inference path ---------------------------------------------------------------------------

def test_too_short_input_names_the_minimum(net):
    with pytest.raises(ValueError, match=r"y_obj: it needs at least 209374 samples \(9\.50 s"):
        net.extract(np.zeros(209_373, np.float32), ["conv7", "y_obj"])
    assert net.extract(np.zeros(209_374, np.float32), ["y_obj"])["y_obj"].shape == (1, 1000)


def test_batch_equals_single(net):
    waves = np.stack([tone(12, seed=s) for s in range(3)])
    batch = net.extract(waves, ["pool2", "conv7", "y_scns"])
    for i, wave in enumerate(waves):
        single = net.extract(wave, ["pool2", "conv7", "y_scns"])
        for name in single:
            assert batch[name].shape[1:] == single[name].shape
            np.testing.assert_allclose(batch[name][i], single[name], rtol=0,
                                       atol=1e-5 * np.abs(single[name]).max())


def test_torch_input_gives_tensors(net):
    out = net.extract(torch.from_numpy(tone(10)), ["conv7"])
    assert isinstance(out["conv7"], torch.Tensor) and out["conv7"].shape == (8, 1024)


@pytest.mark.parametrize("n", [209_374, 22050 * 23 + 17, 22050 * 61 + 12345])
def test_chunked_stream_equals_whole(net, n):
    """Chunk starts on hop multiples with full receptive-field context give the same frames as
    one pass over the whole input, for every layer and odd lengths."""
    wave = tone(n / SAMPLE_RATE + 1, seed=5)[:n]
    layers = ["conv1", "pool1", "pool2", 9, "conv4", "pool5", "conv7", "y_obj", "y_scns"]
    whole = net.extract(wave, layers, chunk_seconds=1e6)
    pieces = np.array_split(wave, [1000, 50_000, 50_001, 400_000])
    for chunk_seconds in (1, 3.3, 17):
        chunked = net.extract_stream(pieces, layers, chunk_seconds=chunk_seconds)
        for name, want in whole.items():
            assert chunked[name].shape == want.shape, (name, chunk_seconds)
            np.testing.assert_allclose(chunked[name], want, rtol=0,
                                       atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_extract_uses_running_statistics_in_train_mode(net):
    wave = tone(10)
    layers = ["conv1.bn", "conv7"]   # one block module by module, the others fused
    want = net.extract(wave, layers)
    stats = net.features[1].running_mean.clone()
    net.train()
    try:
        got = net.extract(wave, layers)
    finally:
        net.eval()
    for name in layers:
        np.testing.assert_array_equal(got[name], want[name])
    assert torch.equal(net.features[1].running_mean, stats)


def test_training_works():
    model = SoundNet().train()
    out = model(torch.from_numpy(np.stack([tone(10, seed=1), tone(10, seed=2)])), ["y_scns"])
    assert out["y_scns"].shape == (2, 401, 1)
    out["y_scns"].logsumexp(1).mean().backward()
    grad = model.features[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_fused_weights_follow_parameter_updates():
    model = SoundNet().eval()
    wave = tone(10)
    before = model.extract(wave, ["pool1"])["pool1"]
    with torch.no_grad():
        model.features[0].bias += 1.0
    after = model.extract(wave, ["pool1"])["pool1"]
    plain = model(wave, ["pool1"])["pool1"][0].T.detach().numpy()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, plain, rtol=0, atol=1e-5 * np.abs(plain).max())


# -- class names ----------------------------------------------------------------------------------

def test_categories_and_top_labels():
    objects, scenes = load_categories("y_obj"), load_categories("y_scns")
    assert len(objects) == 1000 and objects[0] == "tench"
    assert len(scenes) == 401 and scenes[0] == "abbey"
    logits = np.random.default_rng(0).standard_normal((5, 401)).astype(np.float32)
    logits[:, 7] += 4
    top = top_labels(logits, "y_scns", k=3)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).mean(0)
    assert [name for name, _ in top] == [scenes[i] for i in np.argsort(-probs)[:3]]
    np.testing.assert_allclose([p for _, p in top], np.sort(probs)[::-1][:3], rtol=1e-6)
