"""Shared helpers for the training tests: tiny synthetic shards in the data-contract format, with
a signal a small network learns in an epoch or two."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.labels import FINDINGS

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("CXR_OFFLINE", "1")  # never try to download weights in tests

# Per finding: how often it is positive in the synthetic data (rare ones included, one never).
PREVALENCE = np.array([0.3, 0.25, 0.35, 0.4, 0.2, 0.2, 0.15, 0.3, 0.1, 0.12, 0.25, 0.08, 0.05, 0.0])


def synthetic_rows(n: int, image_size: int, rng: np.random.Generator, prefix: str, uncertain_frac: float = 0.0) -> pd.DataFrame:
    """``n`` shard rows: noisy dark images; each positive finding j draws a bright square at its
    own place on a 4x4 grid, so the labels are learnable from the pixels."""
    labels = (rng.random((n, len(FINDINGS))) < PREVALENCE).astype(np.int8)
    if uncertain_frac:
        labels[rng.random(labels.shape) < uncertain_frac] = -1
    cell = image_size // 4
    images = []
    for row in labels:
        img = rng.normal(70, 20, (image_size, image_size))
        for j in np.flatnonzero(row == 1):
            r, c = divmod(j, 4)
            img[r * cell + cell // 4: r * cell + 3 * cell // 4, c * cell + cell // 4: c * cell + 3 * cell // 4] += 140
        images.append(np.clip(img, 0, 255).astype(np.uint8).tobytes())
    df = pd.DataFrame({"image_id": [f"{prefix}{i:05d}.png" for i in range(n)],
                       "patient_id": [f"{prefix}p{i // 2:05d}" for i in range(n)], "image": images})
    for j, name in enumerate(FINDINGS):
        df[name] = labels[:, j]
    return df


def write_run(root: Path, n_train: int = 64, n_val: int = 32, n_test: int = 16, image_size: int = 32, seed: int = 0,
              files: int = 2, uncertain_frac: float = 0.0) -> Path:
    """A run directory with ``shards/split=*/part-*.parquet`` and ``stats.json``, as preprocess writes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    train = None
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        df = synthetic_rows(n, image_size, rng, f"{split}-", uncertain_frac)
        out = root / "shards" / f"split={split}"
        out.mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(np.array_split(np.arange(n), files)):
            df.iloc[part].to_parquet(out / f"part-{k}.parquet", index=False)
        train = df if split == "train" else train
    pixels = np.frombuffer(b"".join(train["image"]), dtype=np.uint8) / 255.0
    (root / "stats.json").write_text(json.dumps({"image_size": image_size, "mean": float(pixels.mean()), "std": float(pixels.std())}))
    return root
