"""Batch inference for evaluation: a split's shards -> pixels, labels and the model's probabilities.

A plain torch loop over arrays in memory, not Ray Data: validation and test hold at most a few
thousand images (224x224 uint8 is 50 KB each, so ~150 MB for 3,000), the robustness study
perturbs the same pixels about twenty times and needs them in memory anyway, and ``cxr evaluate``
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
    held-out images) into memory, sorted by image_id."""
    shards = run.shards
    columns = ["image_id", "patient_id", IMAGE_COLUMN, *FINDINGS]
    frame = scan_rows(shards, rows, columns).to_table().to_pandas()
    frame = frame.sort_values("image_id", kind="mergesort").reset_index(drop=True)
    if frame.empty:
        raise UserInputError(f"{describe_rows(rows)} under {shards}: no image found")
    size_found = int(round(np.sqrt(len(frame[IMAGE_COLUMN].iat[0]))))
    if size_found != image_size:
        raise UserInputError(f"the shards hold {size_found}x{size_found} images but the checkpoint expects "
                             f"{image_size}x{image_size}: evaluate a checkpoint trained on this run's shards")
    images = images_from_column(frame.pop(IMAGE_COLUMN).to_list(), image_size).copy()  # writable, for torch
    frame["image_id"] = frame["image_id"].astype(str)
    frame["patient_id"] = frame["patient_id"].astype(str)
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
