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
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.labels import FINDINGS

SPLITS = ("train", "val", "test")
IMAGE_COLUMN = "image"


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


def read_split(shards: Path, split: str, columns: list[str] | None = None):
    """A split's shards as a Ray Dataset (lazily; the caller's Ray cluster does the reading)."""
    import ray  # noqa: PLC0415 - keep pipelines importable without starting Ray machinery

    path = split_dir(shards, split)
    if not path.exists():
        raise FileNotFoundError(f"no shards for split {split!r} at {path}: run `cxr preprocess` first")
    ds = ray.data.read_parquet(str(path), partitioning=None)
    return ds.select_columns(columns) if columns else ds
