"""Makes the small golden fixture in this folder from the full reference in ../shared/golden.

    python tests/golden/make_fixture.py ../shared/golden

For each input: the waveform as FLAC (lossless, so the same int16 samples), and for each of the
26 Torch layers its first and last FRAMES frames (the whole layer when it is shorter) with the
layer's full shape and float64 sum / sum of squares, so tests still check every frame in bulk.
"""
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

FRAMES = 16
here = Path(__file__).resolve().parent
source = Path(sys.argv[1])
golden = json.loads((source / "golden.json").read_text())
summary = {"sample_rate": golden["sample_rate"], "layer_index": golden["layer_index"], "inputs": {}}
for name, entry in golden["inputs"].items():
    samples, rate = sf.read(source / f"{name}.wav", dtype="int16")
    sf.write(here / f"{name}.flac", samples, rate, subtype="PCM_16")
    stored = np.load(source / f"{name}.npz")
    arrays = {}
    for key, layer in entry["layers"].items():
        channels, frames = layer["shape"]
        if key in stored.files:
            head, tail = stored[key][:, :FRAMES], stored[key][:, -FRAMES:]
        else:
            head, tail = stored[key + "_head"][:, :FRAMES], stored[key + "_tail"][:, -FRAMES:]
        if frames <= 2 * FRAMES:
            arrays[key] = stored[key]
        else:
            arrays[key + "_head"], arrays[key + "_tail"] = head, tail
    np.savez_compressed(here / f"{name}.npz", **arrays)
    summary["inputs"][name] = {"samples": entry["samples"], "layers": entry["layers"]}
(here / "golden.json").write_text(json.dumps(summary, indent=1))
