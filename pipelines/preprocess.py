"""Preprocessing as one streaming Ray Data pipeline: rows -> read/decode/resize -> Parquet shards.

The manifest rows (path, ids, split, labels) become small blocks (``from_pandas``), ``map_batches``
reads each row's file and decodes it to fixed-size 8-bit grayscale with per-image pixel statistics,
``write_parquet`` writes shards partitioned by split. Images that cannot be decoded are written to a ``split=_failed`` partition
with their reason, collected into the quarantine afterwards and removed from the shards, so a bad
file never stops the run and is never lost. Memory stays flat because no stage holds more than a
few blocks at a time (Ray Data's streaming executor).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipelines.errors import UserInputError
from pipelines.imaging import DecodeError, decode_bytes
from pipelines.labels import FINDINGS
from pipelines.manifest import quarantine_records
from pipelines.shards import SPLITS, split_dir

STAGE = "preprocess"
FAILED = "_failed"
BatchChecks = Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]


@dataclass
class PreprocessResult:
    written: dict[str, int]  # images per split
    quarantine: pd.DataFrame  # this stage's rejected images
    stats: dict
    image_table: pd.DataFrame  # one row per input image: decode outcome, original size/mode, pixel stats


META = ("image_id", "patient_id", "split", *FINDINGS)  # the columns each row carries into the decode task
MISSING = "missing file"  # an image deleted since ingest (its row goes to the quarantine, not an error)
ESCAPED = "path escapes image root (a link now resolves outside it; checked when read)"


def _read(path: str, real_root: str) -> bytes:
    """The file's bytes, refused when it (links followed) now lies outside the image root: a file
    swapped for a link since ingest checked it. Raises DecodeError with the reason."""
    if not os.path.realpath(path).startswith(real_root + os.sep):
        raise DecodeError(ESCAPED)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DecodeError(MISSING) from None
    except OSError as err:
        raise DecodeError(f"cannot read file: {err.strerror or err}") from None


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, real_root: str, checks: BatchChecks | None, reject_flags: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read and decode a batch of rows (``abs_path`` and the META columns); never raises for a bad
    image: a missing, escaping or undecodable one, or one with any of ``reject_flags`` set by
    ``checks``, becomes a ``_failed`` row. Each row carries its own labels: no table of the whole
    collection travels to every task (that cost O(collection) per task, quadratic in total)."""
    n = len(batch["abs_path"])
    images, errors, widths, heights, modes, means, stds, clipped = [], [], [], [], [], [], [], []
    for path in batch["abs_path"]:
        path = str(path)
        try:
            decoded = decode_bytes(_read(path, real_root), image_size, path)
        except DecodeError as err:
            images.append(b""); errors.append(str(err)); widths.append(0); heights.append(0); modes.append("")
            means.append(np.nan); stds.append(np.nan); clipped.append(np.nan)
            continue
        pixels = decoded.pixels
        images.append(pixels.tobytes()); errors.append("")
        widths.append(decoded.orig_width); heights.append(decoded.orig_height); modes.append(decoded.orig_mode)
        means.append(pixels.mean()); stds.append(pixels.std()); clipped.append(np.mean((pixels == 0) | (pixels == 255)))
    out: dict[str, np.ndarray] = {
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "patient_id": np.asarray(batch["patient_id"], dtype=object),
        "split": np.array([s if not e else FAILED for s, e in zip(batch["split"], errors)], dtype=object),
        "image": np.array(images, dtype=object),
        **{f: np.asarray(batch[f], dtype=np.int8) for f in FINDINGS},
        "orig_width": np.array(widths, dtype=np.int32),
        "orig_height": np.array(heights, dtype=np.int32),
        "orig_mode": np.array(modes, dtype=object),
        "pixel_mean": np.array(means, dtype=np.float32),
        "pixel_std": np.array(stds, dtype=np.float32),
        "clipped_frac": np.array(clipped, dtype=np.float32),
        "error": np.array(errors, dtype=object),
    }
    if checks is not None:
        out.update(checks(out, image_size))
    rejected = np.zeros(n, dtype=bool)
    for flag in reject_flags:
        rejected |= np.asarray(out[flag], dtype=bool)
    out["split"] = np.where(rejected, FAILED, out["split"]).astype(object)
    assert all(len(v) == n for v in out.values())
    return out


IMAGES_PER_BLOCK_MAX = 64  # bounds a scoring task's memory (64 originals of ~1 MB) whatever the collection size


def default_blocks(n_images: int, cpus: float) -> int:
    """About four blocks per CPU, but never more than IMAGES_PER_BLOCK_MAX images in one (cxr score's
    decode tasks; preprocessing sizes its blocks with ``guided_blocks``).

    Measured on 2 CPUs (benchmarks/preprocess.py, 884 NIH originals): 8 blocks decode 84 img/s,
    55 blocks (16 images each) 58 img/s; per-task overhead dominates small blocks.
    """
    return max(1, min(n_images, max(int(4 * cpus), math.ceil(n_images / IMAGES_PER_BLOCK_MAX))))


BLOCK_BYTES_MAX = 32 * 2**20  # a task's decoded output at most (668 images at 224 px): bounds a worker's memory


def guided_blocks(n_images: int, cpus: float, image_size: int, smallest: int = 8) -> list[int]:
    """Block sizes for ``n_images`` on ``cpus``, largest first (guided self-scheduling): each block
    takes 1/cpus of the images not yet assigned, at least ``smallest`` and at most BLOCK_BYTES_MAX of
    output.

    Why: Ray Data starts a block's task only when a CPU is free and notices a finished task up to
    0.1 s late (its executor polls), so every task costs its CPU an idle gap (~0.13 s each here);
    and equal blocks leave one CPU idle at the end for up to a whole block while the other finishes.
    Few large blocks first keep the gaps few; shrinking blocks last keep every CPU busy to the end.
    Measured on 2 CPUs at 884 NIH originals (benchmarks/preprocess.py, docs/benchmarks.md): the idle
    tail fell from 0.9-1.8 s to under 0.1 s.
    """
    cap = max(smallest, BLOCK_BYTES_MAX // (image_size * image_size))
    sizes, left = [], n_images
    while left > 0:
        size = min(left, cap, max(smallest, math.ceil(left / max(cpus, 1))))
        sizes.append(size)
        left -= size
    return sizes


def train_intensity_stats(shards: Path, image_size: int) -> dict:
    """Mean and std (0..1 units) of all train pixels, from the per-image moments in the shards:
    every image has the same pixel count, so the pooled moments are plain averages."""
    table = pd.read_parquet(split_dir(shards, "train"), columns=["pixel_mean", "pixel_std"])
    if table.empty:
        raise UserInputError("the train split is empty: cannot compute standardization statistics")
    m = table["pixel_mean"].to_numpy(np.float64)
    s = table["pixel_std"].to_numpy(np.float64)
    mean = m.mean()
    std = float(np.sqrt(max(np.mean(s**2 + m**2) - mean**2, 0.0)))
    return {"image_size": image_size, "mean": float(mean / 255.0), "std": std / 255.0, "train_images": int(len(table)), "computed_on": "train"}


def preprocess(
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    images_root: Path,
    shards: Path,
    image_size: int = 224,
    num_blocks: int | None = None,
    batch_size: int | None = None,
    checks: BatchChecks | None = None,
    reject_flags: tuple[str, ...] = (),
    train_stats: bool = True,
) -> PreprocessResult:
    """Run the pipeline on whatever Ray cluster the caller is connected to; rewrites ``shards``.
    ``train_stats=False`` for a collection without a train split (external validation: the model
    standardizes with its own training statistics), whose ``stats`` are then empty.

    ``batch_size=None`` decodes each block of rows as one batch, one task per block: the file read,
    the decode and the write run in one task, and no raw PNG bytes pass through the object store.
    Blocks are sized by ``guided_blocks`` unless ``num_blocks`` asks for that many equal ones.
    """
    import ray  # the pipelines package stays importable without Ray machinery

    if image_size < 8:
        raise UserInputError(f"--image-size must be at least 8, got {image_size}")
    rows = manifest.merge(splits[["image_id", "split"]], on="image_id", how="inner")
    if len(rows) != len(manifest):
        raise UserInputError(f"{len(manifest) - len(rows)} manifest image(s) have no split: run `cxr split` again")
    root = Path(images_root).resolve()
    base = str(root) + os.sep
    rows = rows.assign(abs_path=[os.path.normpath(base + str(p)) for p in rows["path"]])
    refused = _refuse_before_reading(rows)
    rows = rows.drop(index=refused.index)
    shards = Path(shards)
    if shards.exists():
        shutil.rmtree(shards)
    table = rows[["abs_path", *META]].reset_index(drop=True)
    table[list(FINDINGS)] = table[list(FINDINGS)].astype(np.int8)
    if num_blocks:
        parts = [table.iloc[i] for i in np.array_split(np.arange(len(table)), num_blocks) if len(i)]
    else:
        bounds = np.cumsum([0, *guided_blocks(len(table), ray.cluster_resources().get("CPU", 1), image_size)])
        parts = [table.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    ds = ray.data.from_pandas(parts)
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"image_size": image_size, "real_root": os.path.realpath(root), "checks": checks, "reject_flags": tuple(reject_flags)})
    ds.write_parquet(str(shards), partition_cols=["split"])
    return _collect(rows, refused, shards, image_size, tuple(reject_flags), train_stats)


def _refuse_before_reading(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows not to read, with a ``reason``: rows naming one file twice (a manifest from another tool)
    would write one image under two ids. (A file swapped for a link since ingest is refused where
    it is read: ``_read``.)"""
    shared = rows["abs_path"].duplicated(keep=False)
    counts = rows.loc[shared].groupby("abs_path")["abs_path"].transform("size")
    reasons = [f"duplicate file: {n} rows name {p}" for p, n in zip(rows.loc[shared, "path"], counts)]
    return rows[shared].assign(reason=reasons)


def _collect(rows: pd.DataFrame, refused: pd.DataFrame, shards: Path, image_size: int, reject_flags: tuple[str, ...],
             train_stats: bool = True) -> PreprocessResult:
    """Read back only the small columns to account for every input image and build the stats."""
    small = ["image_id", "orig_width", "orig_height", "orig_mode", "pixel_mean", "pixel_std", "clipped_frac", "error", *reject_flags]
    parts = []
    for split in (*SPLITS, FAILED):
        path = split_dir(shards, split) if split != FAILED else shards / f"split={FAILED}"
        if path.exists():
            part = pd.read_parquet(path, columns=small)
            parts.append(part.assign(split=split))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*small, "split"])
    failed_dir = shards / f"split={FAILED}"
    if failed_dir.exists():
        shutil.rmtree(failed_dir)
    seen = set(table["image_id"])
    unread = rows[~rows["image_id"].isin(seen)]
    failed = table[table["split"] == FAILED]
    records = pd.concat([rows, refused]).set_index("image_id")
    reasons = [_failure_reason(r, reject_flags) for r in failed.to_dict("records")] + ["missing file (gone since ingest)"] * len(unread)
    reasons += list(refused["reason"])
    ids = list(failed["image_id"]) + list(unread["image_id"]) + list(refused["image_id"])
    quarantine = quarantine_records(STAGE, reasons, ids, [None] * len(ids), [records.loc[i, ["path", "patient_id"]].to_dict() | {"image_id": i} for i in ids])
    not_read = pd.DataFrame({"image_id": [*unread["image_id"], *refused["image_id"]], "decoded": False,
                             "error": ["missing file"] * len(unread) + list(refused["reason"])})
    image_table = pd.concat([table.assign(decoded=table["error"] == ""), not_read], ignore_index=True)
    written = {s: int((table["split"] == s).sum()) for s in SPLITS}
    if sum(written.values()) + len(quarantine) != len(rows) + len(refused):
        raise RuntimeError(f"preprocess lost or duplicated images: {len(rows) + len(refused)} in, {sum(written.values())} written + {len(quarantine)} quarantined")
    return PreprocessResult(written, quarantine, train_intensity_stats(shards, image_size) if train_stats else {}, image_table)


def _failure_reason(row: dict, reject_flags: tuple[str, ...]) -> str:
    if row["error"] == MISSING:
        return f"{MISSING} (gone since ingest)"
    if row["error"] == ESCAPED or row["error"].startswith("cannot read file"):
        return row["error"]
    if row["error"]:
        return f"cannot decode: {row['error']}"
    return "failed image checks: " + ", ".join(f for f in reject_flags if row.get(f))
