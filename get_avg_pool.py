"""Pool SoundNet frame features into one vector per file.

    python get_avg_pool.py -i ./soundnet/raw -o ./soundnet/avg_pooling/y_scns -f y_scns

Reads RAW/<feature>/**/*.npy, each (frames, channels) as written by extract_feats.py, and writes
OUT/<same relative path>.npy, a float32 vector of C values (2C for meanmax and meanstd). With
--combined it also writes OUT/features.npy, an (N, D) float32 matrix, and OUT/index.csv
(`row,path`), whose row r names the file of matrix row r by its relative path without .npy.
OUT/pooling.json records how the vectors were pooled. Exit status: 0 all good, 1 some input
arrays were bad (each reported, the rest pooled) or OUT filled up, 2 usage or output error.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from soundnet_io import (CSV_LINE_END, METADATA_FILE, atomic_write, csv_cell,
                         remove_stale_partials, save_array, write_failure)

DEFAULT_FEATURE = "conv7"
# Each pool mode is a sequence of reductions over frames, concatenated in this order.
POOLS = {"mean": ("mean",), "max": ("max",), "meanmax": ("mean", "max"), "meanstd": ("mean", "std")}
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
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)   # 2.0 and 3.0: 4-byte length
    shape, _, dtype = read_header(f)
    data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    declared = math.prod(shape) * dtype.itemsize
    if declared > data_bytes and not dtype.hasobject:   # read_array refuses object arrays
        raise ValueError(f"truncated or corrupt: its header declares shape {shape} of {dtype} "
                         f"({declared:,} bytes) but only {data_bytes:,} bytes follow it")
    f.seek(0)


def read_frames(path: Path) -> np.ndarray:
    """The (frames, channels) array at `path`, checked: real numbers, both sizes > 0, finite."""
    frames = read_npy(path)
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


def pool_frames(frames: np.ndarray, pool: str) -> np.ndarray:
    """(T, C) frames -> (C,) float32 vector, or (2C,) for meanmax and meanstd.
    Sums accumulate in float64 so long files lose no precision. Raises BadArray when a value
    does not fit float32 (float64 input beyond +-3.4e38)."""
    vector = np.concatenate([REDUCTIONS[r](frames) for r in POOLS[pool]])
    with np.errstate(over="ignore"):
        pooled = vector.astype(np.float32)
    if not np.isfinite(pooled).all():
        raise BadArray(f"pooled values beyond the float32 range (largest magnitude "
                       f"{np.abs(vector).max():.3g})")
    return pooled


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


def write_text_atomic(path: Path, text: str):
    # surrogateescape: file names that are not valid UTF-8 still round-trip.
    with atomic_write(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


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
    return {**{k: v for k, v in meta.items() if k != "features"}, "feature": described[feature]}


def check_folders(raw: Path, feature: str, out_dir: Path):
    """UsageError, with a hint, for folders that cannot work."""
    feature_dir = raw / feature
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir}: is a file, not a folder")
    if not raw.is_dir():
        raise UsageError(f"-i {raw}: " + ("is a file, not a folder" if raw.exists() else
                                          "no such folder") + "; give the folder "
                         "extract_feats.py wrote (its -o)")
    # Vectors written among the feature folders would be taken for features (and a later
    # extraction would skip files as done), and pooling RAW into OUT would mix the two.
    raw_real, out_real = raw.resolve(), out_dir.resolve()
    if raw_real in (out_real, *out_real.parents) or out_real in raw_real.parents:
        where = ("is" if out_real == raw_real else
                 "is inside" if raw_real in out_real.parents else "holds")
        raise UsageError(f"-o {out_dir} {where} the input -i {raw}: choose a folder outside it")
    if not feature_dir.is_dir():
        if (raw.parent / METADATA_FILE).is_file() and any(raw.glob("**/*.npy")):
            raise UsageError(f"-i {raw} is a feature folder: give its parent and the feature, "
                             f"-i {raw.parent} -f {raw.name}")
        found = ", ".join(list_features(raw)) or "none"
        raise UsageError(f"no feature folder {feature_dir}; features found in {raw}: {found}")


def claim_output(out_dir: Path, keys: list, settings: dict) -> bool:
    """Make OUT agree with `settings`; returns whether its existing vectors may be reused.

    When OUT/pooling.json is missing or records other settings (another --pool or input), the
    vectors of `keys` are deleted before it is rewritten: otherwise a vector pooled the old way,
    newer than its input, would pass the mtime check, even after an interrupted run."""
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


def pool_tree(feature_dir: Path, out_dir: Path, keys: list, pool: str, reuse: bool,
              show_bar: bool):
    """Pool every key; returns (good keys, number pooled now, number skipped as done).
    A bad array is reported on stderr as `path: reason`, and not written."""
    good, pooled, skipped = [], 0, 0
    for key in tqdm(keys, unit="file", disable=not show_bar):
        src, dst = feature_dir / f"{key}.npy", out_dir / f"{key}.npy"
        if reuse and is_done(src, dst):
            skipped += 1
        else:
            try:
                save_array(dst, pool_frames(read_frames(src), pool))
            except BadArray as e:
                tqdm.write(f"{src}: {e}", file=sys.stderr)
                continue
            pooled += 1
        good.append(key)
    return good, pooled, skipped


def write_combined(out_dir: Path, keys: list) -> tuple:
    """Stack OUT/<key>.npy, in the order of `keys`, into OUT/features.npy (N, D) float32 and
    write OUT/index.csv naming each row. Returns the matrix shape."""
    rows = [read_npy(out_dir / f"{key}.npy") for key in keys]
    shapes = sorted({row.shape for row in rows})
    if len(shapes) > 1:
        raise BadArray(f"vectors differ in shape {shapes}: inputs with different channel counts?")
    matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    save_array(out_dir / COMBINED_MATRIX, matrix)
    text = io.StringIO()
    # quotes names holding commas, quotes or line breaks; escapes those a spreadsheet would run
    writer = csv.writer(text, lineterminator=CSV_LINE_END)
    writer.writerow(["row", "path"])
    writer.writerows((row, csv_cell(key)) for row, key in enumerate(keys))
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
    p.add_argument("--combined", action="store_true",
                   help=f"also write {COMBINED_MATRIX} (N, D) and {COMBINED_INDEX} (row,path)")
    p.add_argument("--force", action="store_true",
                   help="pool every file again, even when its vector is newer than its input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    feature_dir, out_dir = args.input / args.feature, args.output
    try:
        check_folders(args.input, args.feature, out_dir)
        extraction = read_extraction(args.input, args.feature)
    except UsageError as e:
        return fail(str(e))
    keys = find_inputs(feature_dir)
    if args.combined and COMBINED_MATRIX[:-len(".npy")] in keys:
        return fail(f"{feature_dir / COMBINED_MATRIX} would be pooled onto {out_dir / COMBINED_MATRIX}, "
                    "where --combined puts the matrix; rename it or drop --combined")

    start = time.perf_counter()
    # The extraction settings are part of ours: arrays extracted anew (another --channel, say)
    # are not reused even where the mtime check would pass them.
    settings = {"feature": args.feature, "input": str(feature_dir.resolve()), "pool": args.pool,
                "extraction": extraction}
    try:
        reuse = claim_output(out_dir, keys, settings) and not args.force
        remove_stale_partials(out_dir)
    except OSError as e:
        return fail(write_failure(e, out_dir))
    show_bar = not args.quiet and sys.stderr.isatty()
    try:
        good, pooled, skipped = pool_tree(feature_dir, out_dir, keys, args.pool, reuse, show_bar)
    except OSError as e:   # OUT is full or became unwritable: later files would fail the same
        print(f"error: {write_failure(e, out_dir)}; stopped; run again to do the rest",
              file=sys.stderr)
        return 1
    failed = len(keys) - len(good)
    status, combined = (1 if failed else 0), ""
    if args.combined:
        try:
            n, d = write_combined(out_dir, good)
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
