"""The Python API is never silently wrong (issue 12): stale fused weights, the fast path's
accuracy on silence and DC, and clear errors for inputs that are not mono float waveforms.
`net` runs on SOUNDNET_TEST_DEVICE (conftest); the float64 references on the CPU."""
import copy
import warnings

import numpy as np
import pytest
import torch

from conftest import ROOT, tone
from soundnet import (BN_EPS, INPUT_SCALE, LAYERS, SAMPLE_RATE, get_layer,
                      load_categories, top_labels)
from test_soundnet import GOLDEN_INFO, golden_wave

ACCURACY = 1e-5   # of the layer's peak |value|, against float64
ALL_LAYERS = list(range(1, 27))   # runs every block module by module
# Only block outputs: runs every block as one fused GEMM ("conv1" and "conv2" are inside theirs).
BLOCK_OUTPUTS = ["pool1", "pool2", "conv3", "conv4", "pool5", "conv6", "conv7", "y_obj", "y_scns"]
TEN_SECONDS = 10 * SAMPLE_RATE


def error_of_peak(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


@pytest.fixture(scope="module")
def reference(net):
    """Every layer through the plain modules in float64: {name: (frames, C)}."""
    double = copy.deepcopy(net).cpu().double().eval()

    def run(wave):
        x = torch.as_tensor(wave, dtype=torch.float64)[None, None] * INPUT_SCALE
        out = {}
        with torch.no_grad():
            for index, module in enumerate(double.features, start=1):
                x = module(x)
                out[LAYERS[index].name] = x[0].T.numpy()
            out["y_obj"], out["y_scns"] = (h(x)[0].T.numpy()
                                           for h in (double.conv8, double.conv8_2))
        return out
    return run


def plain(net, wave, layers):
    return {k: v[0].T.detach().cpu().numpy() for k, v in net(wave, layers).items()}


# -- 1. the fused weights always follow the module ---------------------------------------------

def test_extract_follows_every_kind_of_weight_edit(net):
    """In-place edits through .data bypass the version counters; eps is a plain attribute."""
    wave = tone(10, seed=4)
    layers = ["pool1", "conv7", "y_obj", "y_scns"]
    saved = copy.deepcopy(net.state_dict())
    conv6_bn = net.features[get_layer("conv6.bn").index - 1]
    conv7_bn = net.features[get_layer("conv7.bn").index - 1]
    shifted = [p.detach() + 0.01 * p.detach().abs().mean() for p in net.parameters()]

    def average_in(_):
        for p, q in zip(net.parameters(), shifted):
            p.data.copy_(0.5 * (p.data + q))

    edits = [lambda _: net.conv8.weight.data.mul_(2),
             average_in,
             lambda _: conv7_bn.running_var.data.mul_(4),
             lambda _: setattr(conv6_bn, "eps", 0.5),
             lambda _: net.load_state_dict(saved)]
    try:
        with torch.no_grad():
            before = net.extract(wave, layers)
            for i, edit in enumerate(edits):
                edit(None)
                after, want = net.extract(wave, layers), plain(net, wave, layers)
                for name in layers:
                    assert error_of_peak(after[name], want[name]) < ACCURACY, (i, name)
                changed = [not np.allclose(after[n], before[n], atol=1e-4) for n in layers]
                assert any(changed) or i == len(edits) - 1, i
                before = after
    finally:
        conv6_bn.eps = BN_EPS
        net.load_state_dict(saved)


# -- 2. accuracy on silence, DC and the golden inputs -------------------------------------------

@pytest.mark.parametrize("level,seconds", [(0.0, 10), (0.00125, 10), (-0.03, 10), (0.02, 10),
                                           (0.03, 10), (-0.002, 30)])
def test_fast_path_is_exact_on_silence_and_dc(net, reference, level, seconds):
    """Every layer, both ways the fast path runs a block (fused GEMM when only its output is
    wanted, step by step when an inner layer is), within 1e-5 of peak of float64, all in
    float32. Before conv2 was centred, -0.002 for 30 s was 2e-5 off on conv6 (the fused path);
    with only conv2 centred, the step-by-step path was 1.07e-5 off on conv6.bn at 0.0145."""
    wave = np.full(seconds * SAMPLE_RATE, level, np.float32)
    want = reference(wave)
    for layers in (BLOCK_OUTPUTS, ALL_LAYERS):
        for name, got in net.extract(wave, layers).items():
            assert error_of_peak(got, want[name]) < ACCURACY, (level, name)


@pytest.mark.parametrize("name", sorted(GOLDEN_INFO["inputs"]))
def test_fast_path_is_exact_on_the_golden_inputs(net, reference, name):
    wave = golden_wave(name)
    want = reference(wave)
    for layers in (BLOCK_OUTPUTS, ALL_LAYERS):
        for layer, got in net.extract(wave, layers).items():
            assert error_of_peak(got, want[layer]) < ACCURACY, (name, layer)


# -- 3. degenerate arrays ------------------------------------------------------------------------

def test_reversed_views_work_and_degenerate_arrays_are_refused(net):
    wave = tone(1, seed=2)
    reversed_view = wave[::-1]
    np.testing.assert_array_equal(net.extract(reversed_view, "pool5")["pool5"],
                                  net.extract(reversed_view.copy(), "pool5")["pool5"])
    batch = np.stack([wave, wave * 0.5])[:, ::-1]
    assert net.extract(batch, "pool5")["pool5"].shape[0] == 2
    with pytest.raises(ValueError, match=r"empty batch: shape \(0, 22050\)"):
        net.extract(np.zeros((0, SAMPLE_RATE), np.float32), "pool5")
    with pytest.raises(ValueError, match="got a scalar"):
        net.extract(np.float32(0.5), "pool5")
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 22050\)"):
        net.extract(torch.zeros(1, 1, SAMPLE_RATE), "pool5")
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.extract(np.where(np.arange(len(wave)) == 5, np.nan, wave), "pool5")
    huge = np.where(np.arange(len(wave)) == 5, np.float32(3e38), wave)   # x256: infinity
    for run in (net.extract, net):
        with pytest.raises(ValueError, match=r"samples up to 3e\+38 overflow float32 once "
                                             r"scaled by INPUT_SCALE=256"):
            run(huge, "pool5")
    with pytest.warns(UserWarning, match="peak above"):   # loud, but finite after x256
        assert np.isfinite(net.extract(wave * np.float32(1e36), "pool1")["pool1"]).all()


# -- 4. stereo by mistake ------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 6])
def test_channels_last_audio_is_refused(net, channels):
    stereo = tone(1, channels=max(channels, 2))[:, :channels]
    with pytest.raises(ValueError, match=rf"{channels}-channel audio as \(samples, channels\).*"
                                         "downmix.*load_audio"):
        net.extract(stereo, "pool5")
    with pytest.raises(ValueError, match="channel audio"):
        net(torch.from_numpy(stereo), "pool5")
    # A real batch of a few long waves, and a streamed batch's short last block, are fine.
    assert net.extract(stereo.T.copy(), "pool5")["pool5"].shape[0] == channels
    out = net.extract_stream([stereo.T[:, :-3], stereo.T[:, -3:]], "pool5")
    assert out["pool5"].shape[0] == channels


# -- 5. one layer by name ------------------------------------------------------------------------

def test_a_single_layer_name_or_index(net):
    wave = tone(5, seed=1)
    out = net.extract(wave, "conv7")
    assert list(out) == ["conv7"] and out["conv7"].shape == (4, 1024)
    np.testing.assert_array_equal(net.extract(wave, 24)["conv7"], out["conv7"])
    np.testing.assert_array_equal(net.extract(wave, np.int64(24))["conv7"], out["conv7"])
    assert list(net(wave, "pool5")) == ["pool5"]


# -- 6. integer PCM and loud floats ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.bool_])
def test_integer_samples_are_refused_with_a_hint(net, dtype):
    pcm = (tone(1) * 32767).astype(np.int16).astype(dtype)
    with pytest.raises(ValueError, match=r"integer samples.*32768.*load_audio"):
        net.extract(pcm, "pool5")
    with pytest.raises(ValueError, match="integer samples"):
        net(torch.from_numpy(pcm.astype(np.int16)), "pool5")


def test_loud_float_input_warns_once(net):
    wave = tone(3)
    loud = wave * 32767
    with pytest.warns(UserWarning, match=r"peak above 2\.0.*32768") as caught:
        net.extract_stream([loud[:SAMPLE_RATE], loud[SAMPLE_RATE:]], "pool5")
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.extract(wave / np.abs(wave).max() * 1.3, "pool5")   # an MP3 past 0 dBFS: fine
        net(wave * 1.9, "pool5")
    with pytest.warns(UserWarning, match="peak above"):
        net(torch.from_numpy(loud), "pool5")


# -- 7. top_labels ---------------------------------------------------------------------------------

def test_one_label_form_everywhere_and_the_raw_ids_on_request():
    """top_labels, load_categories and the CLI's table give the readable form (issue 19)."""
    import extract_feats
    scenes, objects = load_categories("y_scns"), load_categories("y_obj")
    assert scenes[scenes.index("bedroom")] == "bedroom" and "stadium/football" in scenes
    assert "apartment building/outdoor" in scenes and objects[0] == "tench"
    raw_scenes = load_categories("y_scns", raw=True)
    raw_objects = load_categories("y_obj", raw=True)
    assert raw_scenes[scenes.index("bedroom")] == "/b/bedroom"
    assert raw_objects[0] == "n01440764 tench, Tinca tinca"
    logits = np.zeros((2, 401), np.float32)
    logits[:, scenes.index("stadium/football")] = 9
    assert top_labels(logits, "y_scns", k=1)[0][0] == "stadium/football"
    assert top_labels(logits, "y_scns", k=1, raw=True)[0][0] == "/s/stadium/football"
    for raw, readable in zip(raw_scenes + raw_objects, scenes + objects):
        assert extract_feats.short_label(raw) == readable == extract_feats.short_label(readable)


def test_top_labels_checks_the_head_and_handles_batches():
    rng = np.random.default_rng(1)
    scenes = rng.standard_normal((3, 2, 401)).astype(np.float32)
    with pytest.raises(ValueError, match=r"y_obj has 1000 classes but the logits have 401 "
                                         r"channels \(those of y_scns\?\)"):
        top_labels(scenes[0], "y_obj")
    with pytest.raises(ValueError, match="unknown head 'conv7'.*y_obj and y_scns"):
        top_labels(scenes[0], "conv7")
    with pytest.raises(ValueError, match="unknown head"):
        load_categories("conv7")
    per_clip = top_labels(scenes, "y_scns", k=2)
    assert per_clip == [top_labels(clip, "y_scns", k=2) for clip in scenes]
    assert len(per_clip) == 3 and len(per_clip[0]) == 2
    assert top_labels(scenes[0, 0], "y_scns", k=1) == top_labels(scenes[0, :1], "y_scns", k=1)


# -- 8. docs and the too-short hint --------------------------------------------------------------

def test_too_short_for_the_heads_points_to_tile_clip(net):
    with pytest.raises(ValueError, match=r"9\.50 s.*soundnet\.tile_clip\(wave\)"):
        net.extract(tone(5), ["conv7", "y_scns"])
    with pytest.raises(ValueError) as short:
        net.extract(np.zeros(100, np.float32), "pool5")
    assert "tile_clip" not in str(short.value)


def test_python_api_page_covers_batches_stereo_tiling_and_imports():
    api = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    for needed in ("(B, T)", "downmix", "soundnet.tile_clip", "sys.path.insert(0,", "int16",
                   'net.extract(wave, "conv7")'):
        assert needed in api, needed
