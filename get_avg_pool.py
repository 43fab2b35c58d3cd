"""Pool SoundNet frame features into one vector per file, or one per window of a time grid.

    python get_avg_pool.py -i ./soundnet/raw -o ./soundnet/avg_pooling/y_scns -f y_scns
    python get_avg_pool.py -i ./soundnet/raw -o ./soundnet/pool5_1s -f pool5 --hop 1

Reads RAW/<feature>/**/*.npy, each (frames, channels) as written by extract_feats.py, and writes
OUT/<same relative path>.npy, a float32 vector of C values (2C for meanmax and meanstd); with
--hop H, a (k, C) array instead, row i pooling [i*H, i*H + W) seconds of the clip (W: --window,
default H; k = ceil(duration / H), the duration from RAW/manifest.csv). With --combined it also
writes OUT/features.npy, an (N, D) float32 matrix, and OUT/index.csv (`row,path`; with --hop
`row,path,window,start_seconds`, one row per window), naming each matrix row by its file's
relative path without .npy. OUT/pooling.json records how the vectors were pooled. A folder of
the earlier PyTorch port's outputs (one pickled dict per file, no soundnet.json) is read too,
without running any code from it. Exit status: 0 all good, 1 some input arrays were bad (each
reported, the rest pooled) or OUT filled up, 2 usage or output error.
"""
import argparse
import csv
import io
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from soundnet_io import (CSV_LINE_END, METADATA_FILE, POOLS, SAMPLE_RATE, FrameGrid,
                         check_grid, csv_cell, load_pickled_npy, pool_windows,
                         pooled_to_float32, read_npy_header, remove_stale_partials, save_array,
                         write_failure, write_text_atomic)

DEFAULT_FEATURE = "conv7"
MANIFEST = "manifest.csv"   # extract_feats.py's; --hop reads each clip's sample count there
# The earlier PyTorch port's <stem>.npy: a pickled dict of (1, C, T, 1) arrays. Its key ->
# (this project's name, Torch module index). Its "conv7" was taken before batch norm.
EARLIER_PORT_KEYS = {"conv7": ("conv7.conv", 22), "y_obj": ("y_obj", 25), "y_scns": ("y_scns", 26)}
EARLIER_PORT_PEEK = 10      # files whose headers are looked at to recognise such a folder
REDUCTIONS = {
    "mean": lambda x: x.mean(axis=0, dtype=np.float64),
    "max": lambda x: x.max(axis=0),
    "std": lambda x: x.std(axis=0, dtype=np.float64),  # population std (ddof=0)
}
COMBINED_MATRIX = "features.npy"
COMBINED_INDEX = "index.csv"
SETTINGS_FILE = "pooling.json"


class BadArray(ValueError):
    """An input array that cannot be pooled; the message says why."""


class UsageError(Exception):
    """A problem with the arguments or the folders, found before any work: exit 2."""


# ---------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------

def read_npy(path: Path) -> np.ndarray:
    """A plain .npy array, never unpickled. Raises BadArray for anything else, and before
    allocating anything when the header declares more data than the file holds."""
    try:
        # read_array rather than np.load: np.load would also open .npz archives.
        with open(path, "rb") as f:
            check_declared_size(f)
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # truncated, not .npy, object array
        raise BadArray(f"unreadable .npy: {e}") from None


def check_declared_size(f):
    """Check that the bytes after an .npy header hold the data it declares (shape x item size),
    then rewind f. A 4 KB file may declare a (10**12, 1024) array: reading it would first
    allocate terabytes. Raises ValueError."""
    shape, _, dtype = read_npy_header(f)
    data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    declared = math.prod(shape) * dtype.itemsize
    if declared > data_bytes and not dtype.hasobject:   # read_array refuses object arrays
        raise ValueError(f"truncated or corrupt: its header declares shape {shape} of {dtype} "
                         f"({declared:,} bytes) but only {data_bytes:,} bytes follow it")
    f.seek(0)


def read_frames(path: Path) -> np.ndarray:
    """The (frames, channels) array at `path`, checked: real numbers, both sizes > 0, finite."""
    return check_frames(read_npy(path))


def check_frames(frames: np.ndarray) -> np.ndarray:
    """frames, if (frames, channels) of real finite numbers with both sizes > 0; else BadArray."""
    if frames.dtype.kind not in "fiu":
        raise BadArray(f"dtype {frames.dtype} is not a real number type")
    if frames.ndim != 2:
        raise BadArray(f"expected shape (frames, channels), got {frames.shape}")
    if frames.shape[0] == 0:
        raise BadArray("zero frames")
    if frames.shape[1] == 0:
        raise BadArray("zero channels")
    if not np.isfinite(frames).all():
        raise BadArray("non-finite values (NaN or inf)")
    return frames


def read_earlier_port_frames(path: Path, key: str) -> np.ndarray:
    """The (frames, channels) array of `key` in one of the earlier port's files, read with the
    restricted unpickler (numpy arrays and plain containers only): a file asking for anything
    else, a payload that would run code, is refused and never runs."""
    try:
        stored = load_pickled_npy(path)
    except pickle.UnpicklingError as e:
        raise BadArray(f"refused, not unpickled: {e}") from None
    except (OSError, ValueError, EOFError, TypeError, AttributeError, IndexError,
            MemoryError) as e:   # truncated, a plain array, an absurd shape
        raise BadArray(f"not a file of the earlier port ({type(e).__name__}: {e})") from None
    if not isinstance(stored, dict):
        raise BadArray(f"not a file of the earlier port: holds a {type(stored).__name__}, "
                       "not a dict of arrays")
    array = stored.get(key)
    if not isinstance(array, np.ndarray):
        raise BadArray(f"no array {key!r} in it (it holds {', '.join(map(str, stored)) or 'nothing'})")
    if array.ndim != 4 or array.shape[0] != 1 or array.shape[3] != 1:
        raise BadArray(f"{key!r} has shape {array.shape}, not the earlier port's (1, C, T, 1)")
    return check_frames(array[0, :, :, 0].T)


def pool_frames(frames: np.ndarray, pool: str) -> np.ndarray:
    """(T, C) frames -> (C,) float32 vector, or (2C,) for meanmax and meanstd.
    Sums accumulate in float64 so long files lose no precision. Raises BadArray when a value
    does not fit float32 (float64 input beyond +-3.4e38)."""
    vector = np.concatenate([REDUCTIONS[r](frames) for r in POOLS[pool]])
    try:
        return pooled_to_float32(vector)
    except ValueError as e:
        raise BadArray(str(e)) from None


def is_done(src: Path, dst: Path) -> bool:
    """Whether dst exists and is at least as new (mtime) as src."""
    try:
        return dst.stat().st_mtime_ns >= src.stat().st_mtime_ns
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------

def list_features(raw: Path) -> list:
    """Names of the feature folders in RAW, sorted."""
    if not raw.is_dir():
        return []
    return sorted(p.name for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_inputs(feature_dir: Path) -> list:
    """Keys of the arrays under feature_dir: relative posix paths without .npy ('a/x'), sorted as
    strings. Hidden names (an interrupted writer's temporary files) are skipped."""
    keys = [p.relative_to(feature_dir).as_posix()[:-len(".npy")]
            for p in feature_dir.rglob("*.npy") if p.is_file() and not p.name.startswith(".")]
    return sorted(keys)


def read_extraction(raw: Path, feature: str) -> dict:
    """What RAW/soundnet.json says about `feature` (settings and its entry); UsageError when it
    is missing or does not describe the feature: arrays nothing describes may be stale."""
    path = raw / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: missing, so nothing says how the arrays in {raw / feature} "
                         "were made; give -i the folder extract_feats.py wrote") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    described = meta.get("features", {}) if isinstance(meta, dict) else {}
    if feature not in described:
        raise UsageError(f"{raw / feature} is not described by {path} (it describes "
                         f"{', '.join(described) or 'no features'}): its arrays were made with "
                         "other settings; extract it again")
    # Not the provenance: a later run with other library versions made the same numbers.
    return {**{k: v for k, v in meta.items() if k not in ("features", "provenance")},
            "feature": described[feature]}


def is_earlier_port_folder(raw: Path, keys: list) -> bool:
    """Whether RAW looks like the earlier port's output: no soundnet.json, and the .npy files
    (the first few of `keys`, relative to RAW) hold a pickled object, not a plain array."""
    if (raw / METADATA_FILE).exists():
        return False
    for key in keys[:EARLIER_PORT_PEEK]:
        try:
            with open(raw / f"{key}.npy", "rb") as f:
                shape, _, dtype = read_npy_header(f)
        except (OSError, ValueError, SyntaxError):   # unreadable: look at the next one
            continue
        return dtype == object and shape == ()
    return False


def earlier_port_key(feature: str) -> str:
    """The earlier port's key for -f: its own ("conv7") or this project's name ("conv7.conv")
    or Torch index ("22"). UsageError for a feature it did not save."""
    for key, (name, index) in EARLIER_PORT_KEYS.items():
        if feature in (key, name, str(index)):
            return key
    saved = ", ".join(f"{key} (Torch module {index})" for key, (_, index) in EARLIER_PORT_KEYS.items())
    raise UsageError(f"-f {feature}: the earlier port saved only {saved}")


def read_sample_counts(raw: Path) -> dict:
    """{output key: its manifest row} from RAW/manifest.csv, the last row per key. Only used to
    look keys up: no path is made from what the file says. UsageError if missing or unreadable."""
    path = raw / MANIFEST
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = {row["path"]: row for row in reader}
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; --hop needs each clip's duration, which "
                         "extract_feats.py records there") from None
    except (OSError, csv.Error, KeyError) as e:   # KeyError: no path column
        raise UsageError(f"{path}: unreadable, not extract_feats.py's manifest ({e!r})") from None
    if "samples" not in (reader.fieldnames or ()):
        raise UsageError(f"{path}: written by an older extract_feats.py, without the clips' "
                         "sample counts --hop needs: extract again with --force")
    return rows


def clip_seconds(rows: dict, key: str, manifest: Path) -> float:
    """The duration of the clip of `key` before tiling, from its manifest row; BadArray when
    the row is missing or cannot say."""
    row = rows.get(key)
    if row is None:
        raise BadArray(f"no row in {manifest}, so its duration is unknown (an array from "
                       "elsewhere?); extract it again")
    if row.get("status") == "failed":
        raise BadArray(f"{manifest} records it as failed: this array is not from its last run")
    samples = row.get("samples") or ""
    if not (samples.isascii() and samples.isdigit() and int(samples) > 0):
        raise BadArray(f"its row in {manifest} has no sample count (written by an older "
                       "version): extract it again with --force to record it")
    return int(samples) / SAMPLE_RATE


def frame_grid(extraction: dict, feature: str) -> FrameGrid:
    """The frame geometry soundnet.json gives for the feature; UsageError when it gives none."""
    try:
        return FrameGrid.from_metadata(extraction["feature"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{METADATA_FILE} gives no frame geometry for {feature} (hop_seconds, "
                         "first_frame_centre_seconds): extract it again to pool it with --hop"
                         ) from None


def check_folders(raw: Path, feature: str, out_dir: Path):
    """UsageError, with a hint, for folders that cannot work."""
    feature_dir = raw / feature
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir}: is a file, not a folder")
    if not raw.is_dir():
        raise UsageError(f"-i {raw}: " + ("is a file, not a folder" if raw.exists() else
                                          "no such folder") + "; give the folder "
                         "extract_feats.py wrote (its -o)")
    check_apart(raw, out_dir)
    if not feature_dir.is_dir():
        if (raw.parent / METADATA_FILE).is_file() and any(raw.glob("**/*.npy")):
            raise UsageError(f"-i {raw} is a feature folder: give its parent and the feature, "
                             f"-i {raw.parent} -f {raw.name}")
        found = ", ".join(list_features(raw)) or "none"
        raise UsageError(f"no feature folder {feature_dir}; features found in {raw}: {found}")


def check_apart(raw: Path, out_dir: Path):
    """UsageError when OUT is RAW, lies inside it or holds it: vectors written among the
    feature folders would be taken for features (and a later extraction would skip files as
    done), and pooling RAW into OUT would mix the two."""
    raw_real, out_real = raw.resolve(), out_dir.resolve()
    if raw_real in (out_real, *out_real.parents) or out_real in raw_real.parents:
        where = ("is" if out_real == raw_real else
                 "is inside" if raw_real in out_real.parents else "holds")
        raise UsageError(f"-o {out_dir} {where} the input -i {raw}: choose a folder outside it")


def claim_output(out_dir: Path, keys: list, settings: dict) -> bool:
    """Make OUT agree with `settings`; returns whether its existing vectors may be reused.

    When OUT/pooling.json is missing or records other settings (another --pool or input), the
    vectors of `keys` are deleted before it is rewritten: otherwise a vector pooled the old way,
    newer than its input, would pass the mtime check, even after an interrupted run. Silently,
    where extract_feats.py refuses: vectors are cheap to pool again from RAW, which stays as it
    is (soundnet_io, "Output files")."""
    path = out_dir / SETTINGS_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")) == settings:
            return True
    except (OSError, ValueError):
        pass
    path.unlink(missing_ok=True)
    for key in keys:
        (out_dir / f"{key}.npy").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=1) + "\n")
    return False


def pool_tree(feature_dir: Path, out_dir: Path, keys: list, pool_file, reuse: bool,
              show_bar: bool):
    """Pool every key with pool_file(key, input path) -> array; returns (good keys, number
    pooled now, number skipped as done). A bad array is reported on stderr as `path: reason`,
    and not written."""
    good, pooled, skipped = [], 0, 0
    for key in tqdm(keys, unit="file", disable=not show_bar):
        src, dst = feature_dir / f"{key}.npy", out_dir / f"{key}.npy"
        if reuse and is_done(src, dst):
            skipped += 1
        else:
            try:
                save_array(dst, pool_file(key, src))
            except BadArray as e:
                tqdm.write(f"{src}: {e}", file=sys.stderr)
                continue
            pooled += 1
        good.append(key)
    return good, pooled, skipped


def write_combined(out_dir: Path, keys: list, hop: float = None) -> tuple:
    """Stack OUT/<key>.npy, in the order of `keys`, into OUT/features.npy (N, D) float32 and
    write OUT/index.csv naming each row. With `hop` (seconds) each file holds (k, D) windows,
    one matrix row each, and index.csv also gives the window index and its start in seconds.
    Returns the matrix shape."""
    rows = [read_npy(out_dir / f"{key}.npy") for key in keys]
    shapes = sorted({row.shape if hop is None else row.shape[1:] for row in rows})
    if len(shapes) > 1:
        raise BadArray(f"vectors differ in shape {shapes}: inputs with different channel counts?")
    if not rows:
        matrix = np.zeros((0, 0), np.float32)
    else:
        matrix = (np.stack(rows) if hop is None else np.concatenate(rows)).astype(np.float32)
    save_array(out_dir / COMBINED_MATRIX, matrix)
    text = io.StringIO()
    # quotes names holding commas, quotes or line breaks; escapes those a spreadsheet would run
    writer = csv.writer(text, lineterminator=CSV_LINE_END)
    if hop is None:
        writer.writerow(["row", "path"])
        writer.writerows((row, csv_cell(key)) for row, key in enumerate(keys))
    else:
        writer.writerow(["row", "path", "window", "start_seconds"])
        windows = ((key, i) for key, row in zip(keys, rows) for i in range(len(row)))
        writer.writerows((r, csv_cell(key), i, repr(round(i * hop, 9)))
                         for r, (key, i) in enumerate(windows))
    write_text_atomic(out_dir / COMBINED_INDEX, text.getvalue())
    return matrix.shape


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="RAW folder written by extract_feats.py (holds one folder per feature)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the vectors")
    p.add_argument("-f", "--feature", default=DEFAULT_FEATURE,
                   help=f"feature folder under RAW to pool (default: {DEFAULT_FEATURE})")
    p.add_argument("--pool", choices=POOLS, default="mean",
                   help="reduction over frames; meanmax and meanstd give 2C values "
                        "(default: mean)")
    p.add_argument("--hop", type=float, default=None, metavar="H",
                   help="seconds: one row per window of this grid instead of one vector per "
                        "file, row i pooling [i*H, i*H + W) of the clip's own duration")
    p.add_argument("--window", type=float, default=None, metavar="W",
                   help="seconds each row pools, with --hop; H when not given")
    p.add_argument("--combined", action="store_true",
                   help=f"also write {COMBINED_MATRIX} (N, D) and {COMBINED_INDEX} (row,path; "
                        "with --hop one row per window, also naming it and its start)")
    p.add_argument("--force", action="store_true",
                   help="pool every file again, even when its vector is newer than its input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def error_exit(message: str) -> int:
    """Say `message` on stderr as an error found before pooling; returns exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def check_grid_args(args):
    """UsageError for --hop and --window values that cannot make a grid."""
    if args.window is not None and args.hop is None:
        raise UsageError("--window needs --hop: the grid's step")
    if args.hop is not None:
        try:
            check_grid(args.hop, args.window)
        except ValueError as e:
            raise UsageError(f"--hop {args.hop:g}" + (f" --window {args.window:g}" if
                             args.window is not None else "") + f": {e}") from None


def plan(args) -> tuple:
    """(folder of the input arrays, their keys, settings for pooling.json, pool_file(key, path)
    -> array) for a folder of extract_feats.py or of the earlier port; UsageError when the
    folders or flags cannot work."""
    check_grid_args(args)
    raw, out_dir = args.input, args.output
    if not (raw / args.feature).is_dir() and raw.is_dir():
        keys = find_inputs(raw)
        if is_earlier_port_folder(raw, keys):
            return plan_earlier_port(args, keys)
    check_folders(raw, args.feature, out_dir)
    extraction = read_extraction(raw, args.feature)
    feature_dir = raw / args.feature
    # The extraction settings are part of ours: arrays extracted anew (another --channel, say)
    # are not reused even where the mtime check would pass them.
    settings = {"feature": args.feature, "input": str(feature_dir.resolve()), "pool": args.pool,
                "extraction": extraction}
    if args.hop is None:
        return feature_dir, find_inputs(feature_dir), settings, \
            lambda key, src: pool_frames(read_frames(src), args.pool)
    grid, rows, window = frame_grid(extraction, args.feature), read_sample_counts(raw), args.window
    settings.update(hop_seconds=args.hop, window_seconds=args.hop if window is None else window,
                    rows="row i pools [i * hop_seconds, i * hop_seconds + window_seconds) "
                         "seconds of the clip, i < ceil(samples / 22050 / hop_seconds)")

    def pool_file(key, src):
        seconds = clip_seconds(rows, key, raw / MANIFEST)
        try:
            return pool_windows(read_frames(src), grid, seconds, args.hop, window, args.pool)
        except ValueError as e:
            raise BadArray(str(e)) from None
    return feature_dir, find_inputs(feature_dir), settings, pool_file


def plan_earlier_port(args, keys: list) -> tuple:
    """plan() for a folder of the earlier port's <stem>.npy dicts, said on stderr."""
    key = earlier_port_key(args.feature)
    name, index = EARLIER_PORT_KEYS[key]
    if args.hop is not None:
        raise UsageError(f"-i {args.input} holds the earlier port's files, which record no "
                         "clip durations (and tiled short clips): --hop needs "
                         "extract_feats.py's manifest.csv; extract the audio again")
    check_apart(args.input, args.output)
    print(f"{args.input}: the earlier port's format (a pickled dict per file, no "
          f"{METADATA_FILE}), read without running code: pooling its {key!r}, which is "
          f"Torch module {index} ({name}" + (", before batch norm; this project's conv7 is "
          "module 24" if key == "conv7" else "") + ")", file=sys.stderr)
    settings = {"feature": name, "torch_index": index, "input": str(args.input.resolve()),
                "pool": args.pool,
                "read": f"the earlier PyTorch port's <stem>.npy: a pickled dict whose {key!r} "
                        "(1, C, T, 1) array gives the (T, C) frames"}
    return args.input, keys, settings, \
        lambda _, src: pool_frames(read_earlier_port_frames(src, key), args.pool)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = args.output
    try:
        feature_dir, keys, settings, pool_file = plan(args)
    except UsageError as e:
        return error_exit(str(e))
    if args.combined and COMBINED_MATRIX[:-len(".npy")] in keys:
        return error_exit(f"{feature_dir / COMBINED_MATRIX} would be pooled onto "
                          f"{out_dir / COMBINED_MATRIX}, where --combined puts the matrix; "
                          "rename it or drop --combined")

    start = time.perf_counter()
    try:
        reuse = claim_output(out_dir, keys, settings) and not args.force
        remove_stale_partials(out_dir)
    except OSError as e:
        return error_exit(write_failure(e, out_dir))
    show_bar = not args.quiet and sys.stderr.isatty()
    try:
        good, pooled, skipped = pool_tree(feature_dir, out_dir, keys, pool_file, reuse, show_bar)
    except OSError as e:   # OUT is full or became unwritable: later files would fail the same
        print(f"error: {write_failure(e, out_dir)}; stopped; run again to do the rest",
              file=sys.stderr)
        return 1
    failed = len(keys) - len(good)
    status, combined = (1 if failed else 0), ""
    if args.combined:
        try:
            n, d = write_combined(out_dir, good, args.hop)
            combined = f"; matrix {n} x {d} in {out_dir / COMBINED_MATRIX}"
        except BadArray as e:
            print(f"error: {out_dir / COMBINED_MATRIX} not written: {e}", file=sys.stderr)
            status = 1
        except OSError as e:
            print(f"error: {out_dir / COMBINED_MATRIX} not written: {write_failure(e, out_dir)}",
                  file=sys.stderr)
            status = 1
    print(f"pooled {pooled} files ({skipped} skipped, {failed} failed) -> {out_dir} "
          f"in {time.perf_counter() - start:.1f} s{combined}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
