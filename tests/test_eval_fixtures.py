"""Shared fixtures for the evaluation tests: a phantom run directory in the data-contract format,
built without Ray or Great Expectations (those stages have their own tests), and a ResNet18 trained
on it for a few epochs with a plain torch loop, so Grad-CAM has something real to explain.

Named test_eval_* so the evaluation tests own it; it holds no tests itself.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.imaging import decode_file
from pipelines.ingest import ingest
from pipelines.labels import FINDINGS
from pipelines.phantoms import make_collection
from pipelines.rundir import RunDir
from pipelines.split import split_patients
from trainers.checkpoint import model_info, save_checkpoint
from trainers.inputs import standardize, to_unit
from trainers.models import build_model

IMAGE_SIZE = 96  # ResNet18's last stage is 3x3 here: coarse, but enough to tell left from right and top from bottom
N_PATIENTS = 110
EPOCHS = 10


@dataclass
class PhantomRun:
    run: RunDir
    checkpoint: Path
    boxes_csv: Path
    images: Path
    train_seconds: float


def write_phantom_run(root: Path, n_patients: int = N_PATIENTS, image_size: int = IMAGE_SIZE, seed: int = 0) -> RunDir:
    """Phantoms -> manifest, patient split, shards, stats.json, source.json, split_report.json."""
    run = RunDir(root).ensure()
    collection = make_collection(run.root / "phantoms", n_patients=n_patients, image_size=image_size, seed=seed)
    manifest = ingest("nih", collection.labels_csv, collection.images).manifest
    splits = split_patients(manifest, test_frac=0.25, val_frac=0.2, min_positives=3, seed=seed).splits
    manifest.to_parquet(run.manifest, index=False)
    splits.to_parquet(run.splits, index=False)
    merged = manifest.merge(splits[["image_id", "split"]], on="image_id")
    for split, part in merged.groupby("split"):
        rows = part[["image_id", "patient_id", *FINDINGS]].copy()
        rows["image"] = [decode_file(collection.images / p, image_size).pixels.tobytes() for p in part["path"]]
        out = run.shards / f"split={split}"
        out.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(out / "part-0.parquet", index=False)
    train = merged[merged["split"] == "train"]
    pixels = np.stack([decode_file(collection.images / p, image_size).pixels for p in train["path"]]) / 255.0
    run.stats.write_text(json.dumps({"image_size": image_size, "mean": float(pixels.mean()), "std": float(pixels.std())}))
    run.source_json.write_text(json.dumps({"source": "nih", "label_file": str(collection.labels_csv),
                                           "images": str(collection.images)}))
    counts = merged.groupby("split").agg(images=("image_id", "size"), patients=("patient_id", "nunique"))
    run.split_report.write_text(json.dumps({"counts": {s: {k: int(v) for k, v in r.items()} for s, r in counts.iterrows()},
                                            "patients_in_two_splits": 0}))
    return run


def _split_arrays(run: RunDir, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.read_parquet(run.shards / f"split={split}")
    images = np.frombuffer(b"".join(frame["image"]), np.uint8).reshape(len(frame), size, size)
    return torch.from_numpy(images.copy()), torch.from_numpy(frame[list(FINDINGS)].to_numpy(np.float32).clip(0, 1))


def train_tiny(run: RunDir, epochs: int = EPOCHS, seed: int = 0) -> Path:
    """A ResNet18 from random weights, trained a few epochs on the train split (weighted BCE);
    writes ``<run>/train/best`` and ``<run>/train/history.csv`` like ``cxr train``."""
    torch.manual_seed(seed)
    stats = json.loads(run.stats.read_text())
    size, mean, std = stats["image_size"], stats["mean"], stats["std"]
    images, labels = _split_arrays(run, "train", size)
    val_images, val_labels = _split_arrays(run, "val", size)
    positives = labels.sum(0)
    pos_weight = ((len(labels) - positives) / positives.clamp(min=1)).clamp(max=20)
    model = build_model("resnet18")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), 32):
            idx = order[start:start + 32]
            loss = criterion(model(standardize(to_unit(images[idx]), mean, std)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
        model.eval()
        with torch.no_grad():
            val_loss = float(criterion(model(standardize(to_unit(val_images), mean, std)), val_labels))
        history.append({"epoch": epoch + 1, "train_loss": total / len(images), "val_loss": val_loss})
    config = {"backbone": "resnet18", "epochs": epochs}
    best = run.train / "best"
    save_checkpoint(best, model, model_info(config, size, mean, std, epochs, {}))
    pd.DataFrame(history).to_csv(run.train / "history.csv", index=False)
    return best


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory) -> PhantomRun:
    """One trained phantom run for every evaluation test of the session (built once: ~30-60 s)."""
    torch.set_num_threads(2)
    run = write_phantom_run(tmp_path_factory.mktemp("eval") / "run")
    start = time.perf_counter()
    checkpoint = train_tiny(run)
    phantoms = run.root / "phantoms"
    return PhantomRun(run, checkpoint, phantoms / "BBox_List_2017.csv", phantoms / "images", time.perf_counter() - start)
