"""The shipped example clips, and the table extract_feats.py --topk prints."""
import csv
import re
import subprocess
import sys

import soundfile as sf

from conftest import ROOT
import extract_feats
from extract_feats import TABLE_FILES, predictions_table

AUDIO = ROOT / "examples" / "audio"


def test_example_clips_are_short_small_and_attributed():
    clips = sorted(p for p in AUDIO.iterdir() if p.suffix in {".mp3", ".ogg"})
    assert len(clips) >= 4
    assert sum(p.stat().st_size for p in clips) <= 2_000_000
    readme = (AUDIO / "README.md").read_text(encoding="utf-8")
    for clip in clips:
        assert 5 <= sf.info(clip).duration <= 15, clip
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{clip.name}`"))
        assert re.search(r"\| (CC0 1\.0|MIT \(below\)|GPL-2\.0-or-later) \|$", row), row


def test_readme_first_command_prints_the_top_labels(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "extract_feats.py"), "-i", str(AUDIO), "-o", str(tmp_path),
         "-f", ".mp3", ".ogg", "--topk", "3", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("top scenes (Places2) and objects (ImageNet)")
    rows = {line.split()[0]: line for line in lines[1::2]}
    assert set(rows) == {"birds", "ocean_waves", "restaurant", "river", "rock_band"}
    # What the pretrained network hears in them (its top 3 scenes, in percent).
    assert "beach" in rows["ocean_waves"] and "ocean" in rows["ocean_waves"]
    assert "restaurant" in rows["restaurant"].split("scenes", 1)[1]
    assert "creek" in rows["river"] and "music studio" in rows["rock_band"]
    assert all(line.split()[0] == "objects" for line in lines[2::2])


def write_predictions(path, keys, k=3):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "head", "rank", "label", "probability"])
        for key in keys:
            for rank in range(k, 0, -1):   # out of order: the table sorts by rank
                writer.writerow([key, "y_scns", rank, f"/s/scene_{rank}/outdoor", 0.5 / rank])
                writer.writerow([key, "y_obj", rank, f"object {rank}, synonym", 0.25 / rank])


def test_table_of_a_large_folder_is_short(tmp_path):
    path = tmp_path / "predictions.csv"
    keys = [f"clips/{i:04d}" for i in range(TABLE_FILES + 30)]
    write_predictions(path, keys)
    lines = predictions_table(path, ["failed/one"] + keys).splitlines()
    assert len(lines) == 1 + 2 * TABLE_FILES + 1
    assert lines[-1] == f"  ... and 30 more in {path}"
    assert lines[1].split() == ["clips/0000", "scenes", "scene", "1/outdoor", "50.0%",
                                "scene", "2/outdoor", "25.0%", "scene", "3/outdoor", "16.7%"]
    assert lines[2].split()[:3] == ["objects", "object", "1"] and "synonym" not in lines[2]
    assert lines[1].index("scene 1") == lines[2].index("object 1")   # aligned columns
    assert "failed/one" not in "\n".join(lines)


def test_table_of_a_small_folder_lists_every_file(tmp_path):
    path = tmp_path / "predictions.csv"
    write_predictions(path, ["a", "b"], k=1)
    lines = predictions_table(path, ["a", "b"]).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["a", "objects", "b", "objects"]
    assert predictions_table(path, ["c"]) == f"no predictions in {path}"


def test_table_reads_names_that_are_not_utf8(tmp_path):
    # Linux file names need not be UTF-8; the logs keep them with surrogateescape.
    out = tmp_path / "out"
    out.mkdir()
    key = b"caf\xe9".decode("utf-8", "surrogateescape")
    extract_feats.CsvLog(out / "predictions.csv", extract_feats.PREDICTION_FIELDS,
                         ["path", "head", "rank"]).append(
        [{"path": key, "head": head, "rank": 1, "label": "x", "probability": 0.5}
         for head in ("y_scns", "y_obj")])
    assert "caf\\udce9  scenes" in predictions_table(out / "predictions.csv", [key])  # printable
