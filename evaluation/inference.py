"""Batch inference for evaluation: a split's shards -> pixels, labels and the model's probabilities.

A plain torch loop over arrays in memory, not Ray Data: a split's pixels are held once (NIH's
official test list, 25,596 images, is 105 MB at 64 px and 1.3 GB at 224 px), the robustness study
perturbs them about twenty times, a chunk at a time (``evaluation.robustness``), and ``cxr evaluate``
and ``cxr predict`` then work without a Ray cluster. Training-sized inference would belong in a
Ray Data ``map_batches`` actor instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from pipelines.shards import IMAGE_COLUMN, Rows, describe_rows, images_from_column, scan_rows

BATCH_SIZE = 64
BATCH_ROWS = 256  # Parquet rows read at a time when loading a split's pixels


@dataclass
class SplitData:
    """One split in memory: ``images`` ``(n, S, S)`` uint8; ``frame`` has image_id, patient_id and
    the 14 label columns (int8; -1 uncertain), in the same row order."""

    images: np.ndarray
    frame: pd.DataFrame

    def labels(self, findings: list[str]) -> np.ndarray:
        """``(n, len(findings))`` int8 labels, columns in the order of ``findings``."""
        return self.frame[list(findings)].to_numpy(dtype=np.int8)


def load_split(run: RunDir, split: str, image_size: int) -> SplitData:
    """Read a split's shards (pixels, ids, labels) into memory, sorted by image_id."""
    return load_rows(run, split, image_size)


def load_rows(run: RunDir, rows: Rows, image_size: int) -> SplitData:
    """Read ``rows`` of the shards (a split's name, or image ids from any split: a CV fold's
    held-out images) into memory, sorted by image_id.

    The pixels go straight into one preallocated array, Parquet batch by Parquet batch: the
    ids and labels are read first (small) to size and order it, then each batch of pixels is
    written into its rows. Reading the whole table and converting it would hold the split's pixels
    three times over at the peak (Arrow, Python bytes, the joined array); this holds them once,
    plus one batch."""
    shards = run.shards
    frame = scan_rows(shards, rows, ["image_id", "patient_id", *FINDINGS]).to_table().to_pandas()
    if frame.empty:
        raise UserInputError(f"{describe_rows(rows)} under {shards}: no image found")
    frame["image_id"] = frame["image_id"].astype(str)
    frame["patient_id"] = frame["patient_id"].astype(str)
    frame = frame.sort_values("image_id", kind="mergesort").reset_index(drop=True)
    position = pd.Index(frame["image_id"])
    if not position.is_unique:
        twice = position[position.duplicated()][0]
        raise UserInputError(f"{describe_rows(rows)} under {shards}: image {twice} is stored more than once")
    images = np.empty((len(frame), image_size, image_size), np.uint8)
    filled = np.zeros(len(frame), bool)
    for batch in scan_rows(shards, rows, ["image_id", IMAGE_COLUMN], batch_size=BATCH_ROWS).to_batches():
        if not batch.num_rows:
            continue
        column = batch.column(IMAGE_COLUMN).to_pylist()
        wrong = next((v for v in column if len(v) != image_size * image_size), None)
        if wrong is not None:
            size_found = int(round(np.sqrt(len(wrong))))
            raise UserInputError(f"the shards hold {size_found}x{size_found} images but the checkpoint expects "
                                 f"{image_size}x{image_size}: evaluate a checkpoint trained on this run's shards")
        where = position.get_indexer([str(i) for i in batch.column("image_id").to_pylist()])
        images[where] = images_from_column(column, image_size)
        filled[where] = True
    if not filled.all():  # the shards changed between the two reads
        raise UserInputError(f"{describe_rows(rows)} under {shards}: image {frame['image_id'][~filled].iat[0]} "
                             "has no pixels (were the shards rewritten while evaluating?)")
    return SplitData(images, frame)


def predict_arrays(model: nn.Module, info: dict, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Sigmoid probabilities ``(n, findings)`` for uint8 images ``(n, S, S)``."""
    from trainers.checkpoint import prepare_input  # torch-heavy, imported with the model

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            out.append(torch.sigmoid(model(prepare_input(batch, info))).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(info["findings"])), np.float32)


def prediction_frame(data: SplitData, probs: np.ndarray, findings: list[str]) -> pd.DataFrame:
    """The predictions table of the contract: ids, one label column per finding, ``prob_<finding>``."""
    frame = data.frame[["image_id", "patient_id", *FINDINGS]].copy()
    for j, name in enumerate(findings):
        frame[f"prob_{name}"] = probs[:, j].astype(np.float32)
    return frame
