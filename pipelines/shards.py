"""The preprocessed-shard format (data contract) and how to read it back.

Layout: ``<run>/shards/split=<train|val|test>/*.parquet`` (hive-partitioned by split, so a stage
reads only the split it needs). One row per image:

- ``image_id``, ``patient_id`` (string)
- ``image``: ``image_size * image_size`` bytes, 8-bit grayscale, row-major (fixed size per run)
- the 14 finding columns (int8: 1, 0, -1 uncertain)
- ``orig_width``, ``orig_height`` (int32), ``orig_mode`` (string): what the file on disk was
- ``pixel_mean``, ``pixel_std`` (float32, 0..255 units, of the resized image) and ``clipped_frac``
  (float32, the fraction of pixels at 0 or 255): feed the train-only standardization statistics and
  the image-quality checks without a second pass over the pixels.
- ``error`` (always empty here: failed decodes are quarantined, not written to a split)
- any per-image check columns the caller's batch checks add (e.g. the image suite's flags)

``stats.json`` beside them: ``image_size``, and ``mean``/``std`` in 0..1 units over the train split.

Readers take ``rows``: a split's name (the run's own train/val/test), or a collection of image ids
taken from whichever splits hold them (cross-validation pools the splits and cuts folds of its own).
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import numpy as np

from pipelines.labels import FINDINGS

SPLITS = ("train", "val", "test")
IMAGE_COLUMN = "image"
Rows = str | Collection[str]  # a split's name, or the image ids to read from every split


def split_dir(shards: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return Path(shards) / f"split={split}"


def images_from_column(column, image_size: int) -> np.ndarray:
    """A batch's ``image`` column (bytes per row) as a ``(n, size, size)`` uint8 array."""
    flat = np.frombuffer(b"".join(bytes(v) for v in column), dtype=np.uint8)
    return flat.reshape(len(column), image_size, image_size)


def labels_from_batch(batch: dict) -> np.ndarray:
    """The 14 finding columns of a batch as an ``(n, 14)`` int8 array, in FINDINGS order."""
    return np.stack([np.asarray(batch[f], dtype=np.int8) for f in FINDINGS], axis=1)


def read_stats(stats_path: Path) -> dict:
    path = Path(stats_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `cxr preprocess --run DIR` first")
    return json.loads(path.read_text())


def describe_rows(rows: Rows) -> str:
    """``rows`` in words, for messages: ``the val split`` or ``412 selected images``."""
    return f"the {rows} split" if isinstance(rows, str) else f"{len(rows)} selected images"


def row_sources(shards: Path, rows: Rows) -> tuple[list[Path], frozenset[str] | None]:
    """The split folders that hold ``rows`` and the image ids to keep from them (None: all rows).

    A split name must have its folder (``cxr preprocess`` writes it); ids are looked up in every
    split folder present."""
    if isinstance(rows, str):
        path = split_dir(shards, rows)
        if not path.exists():
            raise FileNotFoundError(f"no shards for split {rows!r} at {path}: run `cxr preprocess` first")
        return [path], None
    folders = [split_dir(shards, s) for s in SPLITS if split_dir(shards, s).is_dir()]
    if not folders:
        raise FileNotFoundError(f"no shards at {shards}: run `cxr preprocess` first")
    return folders, frozenset(str(i) for i in rows)


def scan_rows(shards: Path, rows: Rows, columns: list[str], batch_size: int | None = None):
    """A pyarrow ``Scanner`` over ``rows`` of the shards (``.to_table()`` or ``.to_batches()``)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    folders, ids = row_sources(shards, rows)
    parts = [pads.dataset(str(f), format="parquet", partitioning=None) for f in folders]
    dataset = parts[0] if len(parts) == 1 else pads.dataset(parts)
    where = None if ids is None else pc.field("image_id").isin(sorted(ids))
    return dataset.scanner(columns=columns, filter=where, **({"batch_size": batch_size} if batch_size else {}))


def every_row(shards: Path, columns: list[str]):
    """``columns`` of every image in every split present, as one pandas frame (cross-validation
    pools the splits)."""
    import pandas as pd

    frames = [scan_rows(shards, s, columns).to_table().to_pandas() for s in SPLITS if split_dir(shards, s).is_dir()]
    if not frames:
        raise FileNotFoundError(f"no shards at {shards}: run `cxr preprocess` first")
    return pd.concat(frames, ignore_index=True)


def keep_ids(batch: dict, ids: frozenset[str]) -> dict:
    """The rows of a numpy batch whose ``image_id`` is in ``ids`` (a Ray Data ``map_batches`` step)."""
    keep = np.isin(np.asarray(batch["image_id"]).astype(str), list(ids))
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def read_rows(shards: Path, rows: Rows, columns: list[str] | None = None):
    """``rows`` of the shards as a Ray Dataset (lazily; the caller's Ray cluster does the reading)."""
    import ray  # keep pipelines importable without starting Ray machinery

    folders, ids = row_sources(shards, rows)
    ds = ray.data.read_parquet([str(f) for f in folders], partitioning=None)
    wanted = columns if ids is None or not columns or "image_id" in columns else [*columns, "image_id"]
    ds = ds.select_columns(wanted) if wanted else ds
    if ids is not None:
        ds = ds.map_batches(keep_ids, batch_format="numpy", fn_kwargs={"ids": ids})
    return ds.select_columns(columns) if wanted != columns else ds


def read_split(shards: Path, split: str, columns: list[str] | None = None):
    """A split's shards as a Ray Dataset (lazily; the caller's Ray cluster does the reading)."""
    return read_rows(shards, split, columns)
