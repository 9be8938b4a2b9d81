"""From the preprocessed shards (Ray Data) to the tensors the loop consumes.

The shard rows are decoded into three numeric columns in Ray Data's own tasks, so the training
workers receive ready arrays: ``image`` (uint8 ``(n, S, S)``: 4x smaller than floats in the object
store and on the wire), ``labels`` (float32, 1/0 and -1 where a label is ignored) and ``key`` (a
stable 63-bit hash of ``image_id``: the per-epoch resampling draws from it). Scaling to [0, 1], augmentation and normalisation happen on the worker's device
(trainers.inputs).

Which rows train and which select the checkpoint is a :class:`Selection`: the run's own ``train``
and ``val`` splits by default, or any images of the shards by id (a cross-validation fold).

This module is what Ray Data's tasks import to run the functions below: it stays free of torch, so
a fresh Ray worker process does not pay seconds of imports before reading its first block.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from pipelines.shards import IMAGE_COLUMN, Rows, describe_rows, images_from_column, labels_from_batch, read_rows, scan_rows
from trainers.sampling import SamplingPlan, resample_rows

SHARD_COLUMNS = [IMAGE_COLUMN, "image_id", *FINDINGS]


@dataclass(frozen=True)
class Selection:
    """The shard rows a training run learns from (``train``) and picks its checkpoint on (``val``):
    split names, or tuples of image ids read from whichever splits hold them."""

    train: Rows = "train"
    val: Rows = "val"


def apply_uncertain(labels: np.ndarray, policy: str) -> np.ndarray:
    """-1 labels per policy: 'zeros' (U-Zeros), 'ones' (U-Ones), 'ignore' (kept as -1: masked)."""
    out = np.asarray(labels, dtype=np.float32).copy()
    if policy == "zeros":
        out[out < 0] = 0.0
    elif policy == "ones":
        out[out < 0] = 1.0
    elif policy != "ignore":
        raise ValueError(f"unknown uncertain policy {policy!r}: choose zeros, ones or ignore")
    return out


def row_keys(image_ids) -> np.ndarray:
    """A stable int64 per image id (the same on every node and run, unlike Python's hash)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") >> 1 for i in image_ids],
        dtype=np.int64,
    )


def to_tensor_batch(batch: dict, image_size: int, uncertain: str) -> dict[str, np.ndarray]:
    """A batch of shard rows as ``image``/``labels``/``key`` arrays (run inside Ray Data tasks)."""
    return {
        "image": images_from_column(batch[IMAGE_COLUMN], image_size),
        "labels": apply_uncertain(labels_from_batch(batch), uncertain),
        "key": row_keys(batch["image_id"]),
    }


def tensor_dataset(shards: Path, rows: Rows, image_size: int, uncertain: str):
    """``rows`` (a split, or image ids) as a Ray Dataset of tensor rows (lazy: executed by whoever iterates it)."""
    ds = read_rows(shards, rows, columns=SHARD_COLUMNS)
    return ds.map_batches(to_tensor_batch, batch_format="numpy", fn_kwargs={"image_size": image_size, "uncertain": uncertain})


def resampled(ds, plan: SamplingPlan, epoch: int):
    """``ds`` with its rows repeated or dropped for ``epoch`` (see trainers.sampling)."""
    return ds.map_batches(resample_rows, batch_format="numpy", fn_kwargs={"plan": plan, "epoch": epoch})


def validation_parts(shards: Path, image_size: int, uncertain: str, parts: int, rows: Rows = "val") -> list:
    """The validation rows read once and cached in the object store, cut into ``parts`` pieces
    of equal row count (one per worker): each epoch then evaluates from memory, every image once."""
    ds = tensor_dataset(shards, rows, image_size, uncertain).materialize()
    n = ds.count()
    if n == 0:
        raise UserInputError(f"validation ({describe_rows(rows)} under {shards}) holds no image: nothing to evaluate")
    return ds.split_at_indices([round(n * k / parts) for k in range(1, parts)]) if parts > 1 else [ds]


def train_label_matrix(shards: Path, uncertain: str, rows: Rows = "train") -> np.ndarray:
    """The training rows' labels ``(n, 14)`` after the uncertainty policy: for class weights and
    the sampling plan. Reads only the 14 small label columns, directly (a Ray job would cost more
    to schedule than the read)."""
    df = scan_rows(shards, rows, list(FINDINGS)).to_table().to_pandas()
    if df.empty:
        raise UserInputError(f"training ({describe_rows(rows)} under {shards}) holds no image")
    return apply_uncertain(df[list(FINDINGS)].to_numpy(), uncertain)


def materialize(ds) -> dict[str, np.ndarray]:
    """A tensor dataset fully in memory (``ingest='memory'``: the upper bound the benchmark compares to)."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {name: np.concatenate([p[name] for p in parts]) for name in ("image", "labels", "key")}
