"""Draw the SoundNet-8 architecture diagram, images/soundnet.png.

Every number in the picture (kernels, strides, pools, channels, hops, receptive fields) comes from
soundnet.py, so the diagram cannot drift from the code. A tool for redrawing the picture only,
not a dependency of the project; needs matplotlib: pip install matplotlib

    python images/draw_soundnet.py
"""
import io
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow comes with matplotlib)

import soundnet  # noqa: E402

OUT = Path(__file__).resolve().parent / "soundnet.png"
FS = 8                                   # points; at 200 dpi still legible at half size
BLUE, GREEN, GREY, ORANGE = "#dbe8f6", "#e3f1df", "#f2f2f2", "#fbe5cf"
HEAD_TEXT = {"y_obj": "ImageNet objects", "y_scns": "Places scenes"}


def secs(t):
    """0.000907 -> '0.091 ms', 0.3715 -> '372 ms', 4.13 -> '4.13 s'."""
    return f"{t * 1000:.2g} ms" if t < 0.01 else f"{t * 1000:.3g} ms" if t < 1 else f"{t:.3g} s"


def box(ax, x, y, w, h, color, lines):
    """Rounded box with lower-left corner (x, y) and centred text lines, the first in bold."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                fc=color, ec="#555555", lw=0.8))
    top = y + h / 2 + 0.27 * (len(lines) - 1) / 2
    for i, text in enumerate(lines):
        ax.text(x + w / 2, top - 0.27 * i, text, ha="center", va="center", fontsize=FS,
                weight="bold" if i == 0 else "normal")


def line(ax, xs, ys, color="#333333", **kw):
    ax.plot(xs, ys, color=color, lw=1.0, zorder=0.5, **kw)


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", color="#333333",
                                                        lw=1.0, shrinkA=0, shrinkB=0))


def timing(layer):
    return [f"hop {secs(layer.hop_seconds)}", f"RF {secs(layer.receptive_field_seconds)}"]


def main():
    fig = plt.figure(figsize=(9, 4.5), dpi=200)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 18)                   # 1 unit = 100 px
    ax.set_ylim(0, 9)
    ax.axis("off")
    ax.text(9, 8.55, "SoundNet-8", ha="center", fontsize=15, weight="bold")
    ax.text(9, 8.05, "1-D CNN on raw audio: 7 conv blocks, then two conv heads on conv7",
            ha="center", fontsize=FS + 1, color="#444444")

    layers = {name: soundnet.LAYERS[i] for name, i in soundnet.FEATURES.items()}
    yc, w, gap, x = 5.65, 1.65, 0.25, 0.1
    scale = f"{soundnet.INPUT_SCALE:g}"
    box(ax, x, yc - 1.0, w, 2.0, GREY, ["input", "raw audio", "mono", f"{soundnet.SAMPLE_RATE} Hz",
                                        f"scaled × {scale}", f"→ [−{scale}, {scale}]"])
    x += w
    for b in soundnet.BLOCKS:
        arrow(ax, x, yc, x + gap, yc)
        x += gap
        h = 1.3 + 0.14 * math.log2(b.out_channels)          # height grows with log channels
        pool = [f"max-pool {b.pool}"] if b.pool > 1 else []
        box(ax, x, yc - h / 2, w, h, BLUE, [b.name, "Conv1d", f"k={b.kernel} s={b.stride}",
                                            f"{b.out_channels} ch", "BN + ReLU", *pool])
        top = yc - h / 2                                    # feature tags hang below
        for name, layer in layers.items():
            if layer.block is b:                            # conv, then pool where present
                line(ax, [x + w / 2] * 2, [top, top - 0.2], color="#888888", ls=":")
                box(ax, x + 0.05, top - 1.4, w - 0.1, 1.2, GREEN,
                    [name, f"{layer.channels} ch", *timing(layer)])
                top -= 1.4
        x += w

    # The two heads branch from conv7.
    hw = 2.35
    hx, mid = 18 - 0.1 - hw, x + 0.2
    for head, hy in zip(soundnet.HEADS, (6.5, 3.45)):
        name, layer = next((n, layer) for n, layer in layers.items() if layer.block is head)
        box(ax, hx, hy - 1.25, hw, 2.5, ORANGE,
            [f"{head.name} → {name}", "Conv1d", f"k={head.kernel} s={head.stride}",
             "no BN / ReLU", f"{head.out_channels} classes:", HEAD_TEXT[name], *timing(layer)])
        line(ax, [x, mid, mid], [yc, yc, hy])
        arrow(ax, mid, hy, hx, hy)

    notes = ("hop: time between consecutive output frames of a layer "
             "(the product of the conv and pool strides so far, in input samples).",
             "RF (receptive field): length of the input audio that one output frame depends on.",
             "k = kernel, s = stride.   Blue box height grows with log2(channels).   Green: the "
             "named features (soundnet.FEATURES) that SoundNet.extract can return.")
    for i, note in enumerate(notes):
        ax.text(0.1, 1.2 - 0.34 * i, note, fontsize=FS, color="#333333", va="center")
    buf = io.BytesIO()                   # a 128-colour palette keeps the file small
    fig.savefig(buf, format="png", dpi=200)
    Image.open(buf).convert("RGB").quantize(128).save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
