"""Batches of waveforms of different lengths give every waveform exactly its arrays alone."""
import numpy as np
import pytest
import torch

import soundnet

ALL_LAYERS = [str(i) for i in range(1, len(soundnet.LAYERS) + 1)]


def noise(n, seed):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


def assert_same(alone, batched):
    assert alone.keys() == batched.keys()
    for name in alone:
        assert batched[name].shape == alone[name].shape, name
        np.testing.assert_allclose(batched[name], alone[name], rtol=0,
                                   atol=1e-5 * max(np.abs(alone[name]).max(), 1e-6), err_msg=name)


def test_mixed_lengths_equal_one_by_one_on_all_layers(net):
    deepest = max(layer.hop for layer in soundnet.LAYERS.values())   # 65536, the heads
    shortest = soundnet.get_layer("y_scns").min_samples
    # ends at many phases of every layer's hop (all powers of two up to the deepest)
    lengths = [shortest, shortest + 1, shortest + deepest - 1, shortest + deepest]
    lengths += [shortest + 4099 * k for k in range(1, 9)]
    waves = [noise(n, seed) for seed, n in enumerate(lengths)]
    batched = net.extract(waves[::-1], ALL_LAYERS)[::-1]   # a list: one result per waveform
    for wave, result in zip(waves, batched):
        assert_same(net.extract(wave, ALL_LAYERS), result)


def test_groups_long_inputs_and_types(net):
    layers = ["pool5", "conv7"]
    lengths = [70000, 5000, 150001, 33333, 70000]
    waves = [noise(n, seed) for seed, n in enumerate(lengths)]
    # batches of 2, and the longest input streamed alone in chunks of ~3 s
    results = net.extract(waves, layers, chunk_seconds=3.0, batch_size=2)
    assert len(results) == len(waves)
    for wave, result in zip(waves, results):
        assert_same(net.extract(wave, layers), result)
    tensors = net.extract([torch.from_numpy(w) for w in waves[:2]], layers)
    assert isinstance(tensors[0]["pool5"], torch.Tensor)
    np.testing.assert_allclose(tensors[1]["conv7"].cpu().numpy(), results[1]["conv7"], atol=1e-5)


def test_list_errors_name_the_problem(net):
    with pytest.raises(ValueError, match="too short for y_scns"):
        net.extract([noise(300000, 0), noise(1000, 1)], ["y_scns"])
    with pytest.raises(ValueError, match="1-D waveforms"):
        net.extract([noise(300000, 0).reshape(2, -1)], ["pool5"])
    assert net.extract([], ["pool5"]) == []


@pytest.mark.parametrize("layers", [soundnet.DEFAULT_FEATURES, ["conv1", "conv7"], ALL_LAYERS],
                         ids=["default", "conv1+conv7", "all"])
def test_batched_is_bit_identical_for_every_feature_set(net, layers, device):
    """Every block is a matrix product whose rows do not depend on how many rows share a call
    (_matmul), also when inner layers are wanted (they once ran through F.conv1d, whose results
    depend on the batch: conv1 + conv7 differed by 3.8e-7): a file's arrays do not depend on
    what it was batched with. Measured with torch's CPU kernels; a GPU's may pick another
    kernel for another matrix size, so there they agree to float32 rounding."""
    lengths = [209374, 441000, 500001, 551250, 300000]
    waves = [noise(n, seed) for seed, n in enumerate(lengths)]
    for wave, result in zip(waves, net.extract(waves, layers, batch_size=3)):
        alone = net.extract(wave, layers)
        if device.type == "cpu":
            for name in alone:
                np.testing.assert_array_equal(result[name], alone[name], err_msg=name)
        else:
            assert_same(alone, result)
