"""Issue 19: nothing silently wrong, nothing outside OUT, hostile names and files refused with
a reason. Tests numbered by the issue's items (the ones of this file's part of it)."""
import csv
import ctypes
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import extract_feats
import get_avg_pool
import soundnet
import soundnet_io
from conftest import ROOT, tone
from test_get_avg_pool import make_raw

# README.md and the reference pages it links (docs/), where each promise is written.
README = "\n".join(path.read_text(encoding="utf-8")
                   for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
NOT_UTF8 = os.fsdecode(b"caf\xe9")   # a Latin-1 name: surrogate-escaped in Python


def extract(*args):
    return extract_feats.main([*map(str, args), "--quiet", "--workers", "0"])


def pool(*args):
    return get_avg_pool.main([*map(str, args), "--quiet"])


def write_clips(folder, names, seconds=1.0):
    for i, name in enumerate(names):
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path.with_name("written.wav"), tone(seconds, seed=i), 22050)
        path.with_name("written.wav").rename(path)   # soundfile takes only UTF-8 names
    return Path(folder)


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def manifest_rows(out):
    return extract_feats.CsvLog(out / "manifest.csv", extract_feats.MANIFEST_FIELDS,
                                ["path"]).rows()


# -- 1. only the default weights path is ever fetched ---------------------------------------------

@pytest.fixture
def no_download(monkeypatch):
    """soundnet.download_weights recording where it was asked to write, then failing."""
    fetched = []

    def download(path=None):
        fetched.append(path)
        raise soundnet.WeightsError(f"would download to {path}")
    monkeypatch.setattr(soundnet, "download_weights", download)
    return fetched


def test_missing_weights_path_is_an_error_in_from_pretrained_and_hub(tmp_path, no_download):
    typo = tmp_path / "my_finetuned_typo.npy"
    with pytest.raises(soundnet.WeightsError, match=f"{typo}: no such weights file"):
        soundnet.SoundNet.from_pretrained(typo)
    with pytest.raises(soundnet.WeightsError, match="/nonexistent.npy: no such weights file"):
        torch.hub.load(str(ROOT), "soundnet", source="local", path="/nonexistent.npy")
    assert no_download == [] and not typo.exists()


def test_the_default_weights_path_is_still_fetched(tmp_path, monkeypatch, no_download):
    default = tmp_path / "models" / "sound8.npy"
    monkeypatch.setattr(soundnet, "WEIGHTS_PATH", default)
    with pytest.raises(soundnet.WeightsError, match="would download"):
        soundnet.SoundNet.from_pretrained(tmp_path / "models" / ".." / "models" / "sound8.npy")
    assert len(no_download) == 1


# -- 6, 19. get_avg_pool: a missing RAW is named; OUT and RAW apart -------------------------------

def test_get_avg_pool_missing_input_says_so(tmp_path, capsys):
    assert pool("-i", tmp_path / "never_extracted", "-o", tmp_path / "x") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"-i {tmp_path / 'never_extracted'}: no such folder" in line


@pytest.mark.parametrize("out, where", [("raw", "is"), ("raw/y_obj", "is inside"),
                                        ("raw/new/pooled", "is inside"), (".", "holds")])
def test_get_avg_pool_output_in_or_around_raw_is_refused(tmp_path, capsys, out, where):
    raw = tmp_path / "raw"
    arrays = make_raw(raw, "conv7", {"a": (3, 4), "b": (2, 4)})
    make_raw(raw, "y_obj", {"a": (3, 5), "b": (2, 5)})
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    assert pool("-i", raw, "-o", tmp_path / out, "-f", "conv7") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"-o {tmp_path / out} {where} the input -i {raw}" in line
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "pooling.json").exists() and len(arrays) == 2


# -- 7. too short without tiling: which features, and how to drop them ----------------------------

@pytest.mark.parametrize("flags, fixes", [
    ([], ["too short for y_obj, y_scns", "take the others alone (--features conv7)",
          "(--min-seconds 10)"]),
    (["--features", "conv7", "pool5", "--topk", "2"],
     ["too short for y_obj, y_scns: drop --topk, or tile", "(--min-seconds 10)"]),
])
def test_too_short_names_the_features_that_need_more_and_how_to_drop_them(tmp_path, flags,
                                                                           fixes):
    folder = write_clips(tmp_path / "in", ["short.wav"], seconds=3.0)
    assert extract("-i", folder, "-o", tmp_path / "out", "-f", ".wav", "--min-seconds", 0,
                   *flags) == 1
    error = manifest_rows(tmp_path / "out")[("short",)]["error"]
    assert "(3.00 s) is too short for y_obj" in error
    for fix in fixes:
        assert fix in error, error


# -- 10, 29. CSVs: "\n" line ends, spreadsheet-safe cells, safe table -----------------------------

@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One run over names a spreadsheet or a terminal would misread."""
    tmp = tmp_path_factory.mktemp("hostile")
    names = ["=HYPERLINK(1).wav", "+x.wav", "-y.wav", "@z.wav", "'quoted.wav", "new\nline.wav",
             f"{NOT_UTF8}.wav", "plain.wav"]
    folder = write_clips(tmp / "in", names)
    out = tmp / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "extract_feats.py"), "-i", str(folder), "-o", str(out),
         "-f", ".wav", "--features", "pool5", "y_scns", "--topk", "2", "--workers", "0",
         "--quiet"], capture_output=True, text=True, cwd=tmp,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})   # as in a UTF-8 desktop locale
    assert result.returncode == 0, result.stderr
    keys = sorted(name[:-len(".wav")] for name in names)
    return out, keys, result.stdout


def test_csvs_end_lines_with_newline_only(hostile_run, tmp_path):
    out, keys, _ = hostile_run
    assert pool("-i", out, "-o", tmp_path / "avg", "-f", "pool5", "--combined") == 0
    for path in (out / "manifest.csv", out / "predictions.csv", tmp_path / "avg" / "index.csv"):
        data = path.read_bytes()
        assert b"\r" not in data.replace(b"new\nline", b""), path
        assert data.count(b"\n") > len(keys)


def test_crlf_manifest_of_an_older_version_is_still_read(hostile_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(hostile_run[0], out)
    rows = manifest_rows(out)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8",   # csv's CRLF
              errors="surrogateescape") as f:
        writer = csv.DictWriter(f, extract_feats.MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows({k: soundnet_io.csv_cell(v) for k, v in row.items()}
                         for row in rows.values())
    assert b"\r\n" in (out / "manifest.csv").read_bytes()
    assert extract("-i", hostile_run[0].parent / "in", "-o", out, "-f", ".wav",
                   "--features", "pool5") == 0
    again = manifest_rows(out)
    assert {k: r["status"] for k, r in again.items()} == {k: "ok" for k in rows}
    assert {k: r["seconds"] for k, r in again.items()} == {
        k: r["seconds"] for k, r in rows.items()}
    assert b"\r\n" not in (out / "manifest.csv").read_bytes()


def test_formula_cells_are_escaped_reversibly(hostile_run, tmp_path):
    out, keys, _ = hostile_run
    with open(out / "manifest.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        cells = {row["path"] for row in csv.DictReader(f)}
    assert cells == {"'" + k if k[0] in "=+-@'" else k for k in keys}
    assert sorted(k for (k,) in manifest_rows(out)) == keys   # read back as written
    assert pool("-i", out, "-o", tmp_path / "avg", "-f", "pool5", "--combined") == 0
    with open(tmp_path / "avg" / "index.csv", newline="", encoding="utf-8",
              errors="surrogateescape") as f:
        index = [soundnet_io.csv_value(row["path"]) for row in csv.DictReader(f)]
    assert sorted(index) == keys


def test_topk_table_shows_a_name_with_a_line_break_on_one_line(hostile_run):
    _, keys, stdout = hostile_run   # printed without an encoding error
    lines = stdout.splitlines()
    assert len(lines) == 1 + 2 * len(keys)   # title, then scenes and objects per file
    assert any(re.match(r"  new\\nline +scenes ", line) for line in lines), stdout
    assert any(re.match(r"  caf\\udce9 +scenes ", line) for line in lines), stdout


# -- 12. README's layer indices -------------------------------------------------------------------

def test_readme_names_each_layer_by_its_own_index():
    cited = re.findall(r"`([a-z0-9_]+\.(?:conv|bn|relu|pool))`, index (\d+)", README)
    assert cited
    for name, index in cited:
        assert soundnet.get_layer(int(index)).name == name, (name, index)


# -- 13. the classifier recipe on ESC's official folds --------------------------------------------

def test_official_fold_recipe_runs_on_a_tiny_stand_in(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    block = re.search(r"```python\n((?:(?!```).)*PredefinedSplit(?:(?!```).)*)```", README,
                      re.DOTALL).group(1)
    # ESC-50's layout: meta/esc50.csv (filename, fold, target, category, esc10, ...) and the
    # pooled vectors as get_avg_pool.py --combined writes them; 2 classes x 5 folds x 2 clips.
    rng = np.random.default_rng(0)
    meta, vectors = [], {}
    for fold in range(1, 6):
        for clip in range(2):
            for target, category in ((0, "dog"), (1, "rooster")):
                name = f"{fold}-{100 + clip}-A-{target}"
                meta.append({"filename": f"{name}.wav", "fold": fold, "target": target,
                             "category": category, "esc10": True, "src_file": 100 + clip,
                             "take": "A"})
                vectors[name] = rng.standard_normal(8).astype(np.float32) + 4 * target
    meta_csv = tmp_path / "ESC-50-master" / "meta" / "esc50.csv"
    meta_csv.parent.mkdir(parents=True)
    with open(meta_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(meta[0]))
        writer.writeheader()
        writer.writerows(meta)
    pooled = tmp_path / "esc50" / "pool5"
    for name, vector in vectors.items():
        soundnet_io.save_array(pooled / f"{name}.npy", vector)
    get_avg_pool.write_combined(pooled, sorted(vectors))
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    accuracy = re.fullmatch(r"(\d+\.\d)% over the 5 official folds.*\n", result.stdout)
    assert accuracy and float(accuracy.group(1)) >= 90, result.stdout


# -- 15. how long the tests take ------------------------------------------------------------------

def test_readme_says_how_long_the_test_suite_takes():
    setup = README[README.index("Run the tests:"):README.index("## What is where")]
    assert re.search(r"takes (about )?[0-9]+(-[0-9]+)? minutes?", setup), setup


# -- 16. --force removes only feature folders inside OUT ------------------------------------------

def test_force_removes_no_folder_named_by_a_hostile_soundnet_json(tmp_path):
    folder = write_clips(tmp_path / "in", ["a.wav"])
    out = tmp_path / "work" / "out"
    victims = [tmp_path / "victim", tmp_path / "work" / "victim2"]
    for victim in victims:
        (victim / "conv7").mkdir(parents=True)
        (victim / "keep.txt").write_text("mine")
    (out / "conv7").mkdir(parents=True)
    np.save(out / "conv7" / "old.npy", np.ones((2, 2), np.float32))
    meta = {"sample_rate": 22050, "weights_sha256": "0" * 64, "min_seconds": 20.0,
            "channel": "mean", "features": {str(victims[0]): {}, "../victim2": {}, "conv7": {}}}
    (out / "soundnet.json").write_text(json.dumps(meta))
    assert extract("-i", folder, "-o", out, "-f", ".wav", "--features", "conv7", "--force") == 0
    for victim in victims:
        assert (victim / "keep.txt").read_text() == "mine" and (victim / "conv7").is_dir()
    assert not (out / "conv7" / "old.npy").exists() and (out / "conv7" / "a.npy").exists()
    assert set(json.loads((out / "soundnet.json").read_text())["features"]) == {"conv7"}


# -- 17, 28. --list: nothing outside -i, relative -i, a file listed twice -------------------------

def test_list_entry_reaching_outside_input_is_refused(tmp_path, capsys):
    write_clips(tmp_path / "data" / "in", ["a.wav"])
    write_clips(tmp_path / "data" / "other", ["b.wav"])
    listed = tmp_path / "list.txt"
    entry = tmp_path / "data" / "in" / ".." / ".." / "data" / "other" / "b.wav"
    listed.write_text(f"{tmp_path / 'data' / 'in' / 'a.wav'}\n{entry}\n")
    out = tmp_path / "out"
    assert extract("--list", listed, "-i", tmp_path / "data" / "in", "-o", out, "-f", ".wav",
                   "--features", "conv7") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{entry} is not inside -i" in line
    assert not list(tmp_path.rglob("*.npy"))


def test_list_with_relative_input_and_absolute_entries_and_a_repeat(tmp_path, monkeypatch):
    folder = write_clips(tmp_path / "data" / "in", ["a.wav", "sub/b.wav"])
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(str(folder / name) for name in ["a.wav", "sub/b.wav", "a.wav"]))
    args = extract_feats.parse_args(["--list", str(listed), "-i", "../data/in", "-o", "out"])
    assert extract_feats.find_inputs(args) == {
        "a": (folder / "a.wav", "a.wav"), "sub/b": (folder / "sub" / "b.wav", "sub/b.wav")}


# -- 20. sizes checked before anything is allocated -----------------------------------------------

def test_npy_declaring_more_than_it_holds_is_a_bad_file_not_a_crash(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw(raw, "conv7", {"a": (3, 4), "z": (2, 4)})
    with open(raw / "conv7" / "huge.npy", "wb") as f:   # 4 KB declaring 4 TB
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 12, 1024)})
        f.write(bytes(4096))
    assert pool("-i", raw, "-o", tmp_path / "avg") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "MemoryError" not in err
    line = next(line for line in err.splitlines() if "huge.npy" in line)
    assert str((10 ** 12, 1024)) in line and "only 4,096 bytes" in line
    assert "pooled 2 files (0 skipped, 1 failed)" in err
    assert {p.name for p in (tmp_path / "avg").glob("*.npy")} == {"a.npy", "z.npy"}


class HugeArray:
    def __reduce__(self):
        return np.ndarray, ((2 ** 45,),)


def test_weights_file_of_the_wrong_size_is_refused_before_unpickling(tmp_path):
    tiny = tmp_path / "tiny.npy"   # a pickle that would allocate 256 TB
    np.save(tiny, np.array(HugeArray(), dtype=object), allow_pickle=True)
    assert tiny.stat().st_size < 1000
    with open(tiny, "rb") as f:   # it would: the real payload
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        with pytest.raises(MemoryError):
            pickle.load(f)
    with pytest.raises(soundnet.WeightsError, match=r"not unpickled"):
        soundnet.load_weights(tiny)
    sparse = tmp_path / "sparse.npy"   # 30 GB of nothing: not read, not hashed
    with open(sparse, "wb") as f:
        f.truncate(30 << 30)
    with pytest.raises(soundnet.WeightsError, match=r"32,212,254,720 bytes.*57,429,057"):
        soundnet.load_weights(sparse)


def test_weights_are_hashed_in_blocks(monkeypatch):
    events = []

    class Recording:   # the file load_weights opens, recording its reads up to the rewind
        def __init__(self, *args):
            self.f = open(*args)

        def read(self, n=-1):
            events.append(n)
            return self.f.read(n)

        def seek(self, *args):
            events.append("seek")
            return self.f.seek(*args)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(soundnet, "open", Recording, raising=False)
    assert soundnet.load_weights(soundnet.WEIGHTS_PATH)[1] == soundnet.WEIGHTS_SHA256
    hashing = events[:events.index("seek")]
    assert len(hashing) > 50 and all(0 < n <= 1 << 20 for n in hashing), hashing[:3]


# -- 21. --shard on names that are not UTF-8 ------------------------------------------------------

def test_shards_split_non_utf8_names_and_keep_utf8_ones_where_they_were(tmp_path):
    names = [f"{NOT_UTF8}.wav", "café/ünï.wav", "plain.wav", f"sub/{NOT_UTF8}x.wav"]
    folder = write_clips(tmp_path / "in", names)
    found = extract_feats.find_inputs(extract_feats.parse_args(
        ["-i", str(folder), "-o", str(tmp_path / "out"), "-f", ".wav"]))
    parts = [{k for k in found if extract_feats.in_shard(k, (i, 3))} for i in (1, 2, 3)]
    assert sorted(set().union(*parts)) == sorted(found) and sum(map(len, parts)) == len(found)
    for key in ("café/ünï", "plain"):   # as before the change: crc32 of the UTF-8 bytes
        shard = zlib.crc32(key.encode("utf-8")) % 3 + 1
        assert key in parts[shard - 1]


def test_shard_run_takes_a_non_utf8_name(tmp_path):
    folder = write_clips(tmp_path / "in", [f"{NOT_UTF8}.wav"])
    key = NOT_UTF8
    shard = zlib.crc32(os.fsencode(key)) % 2 + 1
    assert extract("-i", folder, "-o", tmp_path / "out", "-f", ".wav", "--features", "conv7",
                   "--shard", f"{shard}/2") == 0
    assert (tmp_path / "out" / "conv7" / f"{key}.npy").exists()


# -- 22. truncated WAVs ---------------------------------------------------------------------------

def test_truncated_wav_is_an_error_whole_and_streamed_ones_decode(tmp_path):
    full = tmp_path / "full.wav"
    sf.write(full, tone(5.0), 22050, subtype="PCM_16")
    data = full.read_bytes()
    for name, size in (("cut100.wav", 100), ("half.wav", len(data) // 2)):
        (tmp_path / name).write_bytes(data[:size])
        with pytest.raises(soundnet_io.AudioError,
                           match=rf"{name}: truncated WAV data: its header declares 110250 "
                                 rf"frames \(5.000 s\), the file holds {(size - 44) // 2}$"):
            soundnet_io.load_audio(tmp_path / name)
    assert len(soundnet_io.load_audio(full)) == 110250
    # A streaming writer (ffmpeg to a pipe) leaves the sizes unknown: 0xFFFFFFFF.
    streamed = bytearray(data)
    streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(streamed)
    np.testing.assert_array_equal(soundnet_io.load_audio(tmp_path / "streamed.wav"),
                                  soundnet_io.load_audio(full))


# -- 23. unreadable subfolders --------------------------------------------------------------------

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2   # linux/prctl.h, capability.h
NO_CAPABILITY_DROP = 99


def without_root_override():
    """A preexec_fn: the child keeps root's uid but not the capabilities by which root reads
    any folder, so mode 000 holds for it as for any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            os._exit(NO_CAPABILITY_DROP)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="permissions as on Linux")
def test_unreadable_subfolder_is_named_in_a_warning(tmp_path):
    folder = write_clips(tmp_path / "in", ["a.wav", "locked/b.wav"])
    (folder / "locked").chmod(0)
    code = ("import sys, extract_feats as e; "
            "print(sorted(e.find_inputs(e.parse_args(sys.argv[1:]))))")
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, "-i", str(folder), "-o", "x", "-f", ".wav"], cwd=ROOT,
            capture_output=True, text=True,
            preexec_fn=without_root_override if os.geteuid() == 0 else None)
    finally:
        (folder / "locked").chmod(0o755)
    if result.returncode == NO_CAPABILITY_DROP:
        pytest.skip("root here cannot drop its override of file permissions")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['a']"
    assert result.stderr.strip() == (f"warning: cannot read folder {folder / 'locked'} "
                                     "(Permission denied): its files are not taken")


# -- 27. names that are not UTF-8: in --list, and read back by README's one-liners ----------------

def test_list_line_that_is_not_utf8_is_taken(tmp_path):
    folder = write_clips(tmp_path / "in", [f"{NOT_UTF8}.wav", "b.wav"])
    listed = tmp_path / "list.txt"
    listed.write_bytes(os.fsencode(folder / f"{NOT_UTF8}.wav") + b"\n"
                       + os.fsencode(folder / "b.wav") + b"\n")
    args = extract_feats.parse_args(["--list", str(listed), "-o", str(tmp_path / "out")])
    assert sorted(extract_feats.find_inputs(args)) == sorted([NOT_UTF8, "b"])


def test_readme_manifest_one_liner_reads_non_utf8_names(tmp_path):
    line = re.search(r"^python -c \"(import csv, collections.*)\"$", README, re.M).group(1)
    (tmp_path / "raw").mkdir()
    log = extract_feats.CsvLog(tmp_path / "raw" / "manifest.csv",
                               extract_feats.MANIFEST_FIELDS, ["path"])
    log.append([{"path": NOT_UTF8, "status": "ok"}, {"path": "b", "status": "failed"}])
    result = subprocess.run([sys.executable, "-c", line], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Counter({'ok': 1, 'failed': 1})"
