"""Correct on every device (issue 17): no float64 anywhere (MPS has none), IEEE float32 whatever
the process-wide TF32 / bfloat16 settings, labels from tensors on any device, and the
few-launch path that GPUs take, run here on the CPU."""
import contextlib
import copy
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

import extract_feats
import soundnet
import soundnet_hear as hear
from benchmark import count_launches, launch_clips
from conftest import tone
from soundnet import SAMPLE_RATE, top_labels

ALL_LAYERS = list(range(1, 27))
BACKEND_PRECISIONS = [  # torch >= 2.9's per-backend settings that `extract` sets to "ieee"
    ("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv")]


class RefuseFloat64(TorchDispatchMode):
    """Refuses, as MPS does, every operation that makes or reads a float64 tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def float64(tree):
            return any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 or
                       t is torch.float64 for t in _pytree.tree_leaves(tree))
        if float64((args, kwargs)):
            raise TypeError(f"{func}: float64 (MPS has none)")
        out = func(*args, **kwargs)
        if float64(out):
            raise TypeError(f"{func} made a float64 tensor (MPS has none)")
        return out


def every_path(net):
    """extract on one wave, a batch, a list, a stream and inner layers; forward; the HEAR
    module. Returns what each gave, for checks."""
    wave = tone(12, seed=1)
    model = hear.SoundNetHEAR(net)
    return {
        "one": net.extract(wave),
        "float64 numpy": net.extract(wave.astype(np.float64), ["pool5"]),
        "batch": net.extract(np.stack([wave, wave[::-1]]), ["conv7", "y_scns"]),
        "list": net.extract([wave, wave[:SAMPLE_RATE * 10 + 7]], ["conv1", "conv7", "y_obj"]),
        "stream": net.extract_stream(np.array_split(wave, [1000, 100_000]), ["pool2", "y_obj"],
                                     chunk_seconds=3),
        "inner": net.extract(torch.from_numpy(wave), ALL_LAYERS),
        "forward": net(wave, ["conv2.bn", "conv7", "y_scns"]),
        "hear timestamps": hear.get_timestamp_embeddings(torch.from_numpy(wave[None]), model),
        "hear scene": hear.get_scene_embeddings(torch.from_numpy(wave[None, :SAMPLE_RATE]), model),
    }


# -- 1. no float64: what MPS refuses ------------------------------------------------------------

def test_every_path_runs_without_float64(net):
    fresh = copy.deepcopy(net)
    fresh._fused = None   # its folded weights are built inside the mode too
    with RefuseFloat64():
        results = every_path(fresh)
        assert top_labels(results["one"]["y_scns"], "y_scns")
    assert set(results) == set(every_path(net))


def test_default_cli_runs_without_float64(tmp_path):
    raw = tmp_path / "in"
    raw.mkdir()
    for i, seconds in enumerate((3, 10, 30)):
        sf.write(raw / f"clip{i}.wav", tone(seconds, seed=i), SAMPLE_RATE)
    threads = torch.get_num_threads()
    try:
        with RefuseFloat64():
            code = extract_feats.main(["-i", str(raw), "-o", str(tmp_path / "out"), "-f", ".wav",
                                       "--workers", "0", "--topk", "2", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    arrays = sorted(p.relative_to(tmp_path / "out").as_posix()
                    for p in (tmp_path / "out").rglob("*.npy"))
    assert arrays == [f"{f}/clip{i}.npy" for f in ("conv7", "y_obj", "y_scns") for i in range(3)]


# -- 2. IEEE float32 whatever the process-wide precision settings --------------------------------

def precision_state() -> dict:
    """Every setting that lets float32 products round to TF32 or bfloat16; the older getters
    raise after a mix of old and new settings (torch >= 2.9), which is recorded as such."""
    state = {}
    for name, get in (("matmul precision", torch.get_float32_matmul_precision),
                      ("cudnn allow_tf32", lambda: torch.backends.cudnn.allow_tf32)):
        try:
            state[name] = get()
        except RuntimeError:
            state[name] = "mixed"
    for backend, op in BACKEND_PRECISIONS:
        setting = getattr(getattr(torch.backends, backend), op, None)
        if setting is not None and hasattr(setting, "fp32_precision"):
            state[f"{backend}.{op}"] = setting.fp32_precision
    return state


class ObservePrecision(TorchDispatchMode):
    """Records precision_state() at every convolution and matrix product."""
    CONVOLUTIONS = ("conv1d", "convolution")
    PRODUCTS = CONVOLUTIONS + ("matmul", "mm", "addmm", "bmm")

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            kind = "convolution" if name in self.CONVOLUTIONS else "product"
            self.seen[(kind, tuple(sorted(precision_state().items())))] += 1
        return func(*args, **(kwargs or {}))


def set_backend_precision(backend, op, value):
    setting = getattr(getattr(torch.backends, backend), op, None)
    if setting is None or not hasattr(setting, "fp32_precision"):
        pytest.skip(f"this torch has no torch.backends.{backend}.{op}.fp32_precision")
    setting.fp32_precision = value


def legacy_high():
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def new_api_tf32():
    set_backend_precision("cuda", "matmul", "tf32")
    set_backend_precision("cudnn", "conv", "tf32")
    set_backend_precision("mkldnn", "matmul", "bf16")


@pytest.fixture
def restore_precision():
    """Puts back the settings a test changed, by torch's own means."""
    before = precision_state()
    yield
    torch.set_float32_matmul_precision(before["matmul precision"])
    torch.backends.cudnn.allow_tf32 = before["cudnn allow_tf32"]
    for backend, op in BACKEND_PRECISIONS:
        key = f"{backend}.{op}"
        if key in before:
            getattr(getattr(torch.backends, backend), op).fp32_precision = before[key]
    assert precision_state() == before


@pytest.mark.parametrize("settings", [legacy_high, lambda: torch.set_float32_matmul_precision(
    "medium"), new_api_tf32], ids=["high+cudnn_tf32", "medium", "fp32_precision=tf32/bf16"])
def test_every_path_computes_in_ieee_float32_and_restores_the_settings(
        net, restore_precision, settings):
    settings()
    before = precision_state()
    observe = ObservePrecision()
    with observe:
        every_path(net)
    assert precision_state() == before
    kinds = Counter(kind for kind, _ in observe.seen.elements())
    assert kinds["convolution"] > 0 and kinds["product"] > 0, kinds   # forward, extract
    for _, state in observe.seen:
        state = dict(state)
        assert state.pop("matmul precision") in ("highest", "mixed"), state
        assert state.pop("cudnn allow_tf32") in (False, "mixed"), state
        assert set(state.values()) <= {"ieee"}, state


# -- 4. labels from tensors of any kind --------------------------------------------------------

def test_top_labels_takes_any_tensor(net):
    scenes = net.extract(torch.from_numpy(tone(10)), ["y_scns"])["y_scns"]   # inference tensor
    want = top_labels(scenes.cpu().numpy(), "y_scns", k=3)
    assert top_labels(scenes, "y_scns", k=3) == want
    grad = scenes.clone().requires_grad_()
    assert top_labels(grad, "y_scns", k=3) == want
    assert top_labels(grad[None], "y_scns", k=3) == [want]
    half = top_labels(scenes.to(torch.bfloat16), "y_scns", k=3)
    assert [name for name, _ in half][:1] == [want[0][0]]


# -- 5. the few-launch path of GPUs, on the CPU ----------------------------------------------

@contextlib.contextmanager
def device_path(monkeypatch):
    """The path every device but the CPU takes (large tiles, one masking operation per block,
    one weight comparison), run on the CPU."""
    with monkeypatch.context() as patch:
        patch.setattr(soundnet, "HOST_DEVICES", ())
        yield


def test_device_path_equals_the_cpu_path(net, monkeypatch):
    clips = launch_clips(8)
    for layers in (soundnet.DEFAULT_FEATURES, ["conv1", "pool2", "conv5.bn", "conv7", "y_obj"]):
        on_cpu = net.extract(clips, layers)
        with device_path(monkeypatch):
            on_device = net.extract(clips, layers)
        for want, got in zip(on_cpu, on_device):
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=0,
                                           atol=1e-6 * np.abs(want[name]).max(), err_msg=name)


def test_device_path_follows_weight_edits(monkeypatch):
    model = soundnet.SoundNet.from_pretrained()
    wave = tone(10)
    with device_path(monkeypatch), torch.no_grad():
        before = model.extract(wave, ["pool5"])["pool5"]
        model.features[0].weight.data.mul_(1.5)      # bypasses version counters
        after = model.extract(wave, ["pool5"])["pool5"]
        plain = model(wave, ["pool5"])["pool5"][0].T.numpy()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, plain, rtol=0, atol=1e-5 * np.abs(plain).max())


def test_device_path_launches_few_kernels_and_waits_once(net):
    """One batch of 8 x 30 s: on the CPU path a GEMM per cache-sized tile, a zero fill per row
    and block, 42 weight comparisons; on the device path a few operations per block and one
    comparison (tests/benchmark.py prints these counts for 64 x 30 s)."""
    clips = launch_clips(8)
    host_ops, host_waits = count_launches(net, clips, host_path=True)
    device_ops, device_waits = count_launches(net, clips, host_path=False)
    assert host_ops > 1000 and host_waits == 42, (host_ops, host_waits)
    assert device_ops < 150 and device_waits == 1, (device_ops, device_waits)
