"""Shared fixtures for the evaluation tests: a phantom run directory in the data-contract format,
built without Ray or Great Expectations (those stages have their own tests), and a ResNet18 trained
on it for a few epochs with a plain torch loop, so Grad-CAM has something real to explain.

Named test_eval_* so the evaluation tests own it; it holds no tests itself.
"""
from __future__ import annotations

import json
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

# ResNet18's last stage is 4x4 at 112 pixels: coarse, but enough to point at the heart or a lung
# base (at 64 pixels it is 2x2 and every peak lies in a corner quarter). 50 patients and 6 epochs
# take about 20 s on two cores; 4 epochs are too few for Grad-CAM to find the heart.
IMAGE_SIZE = 112
N_PATIENTS = 50
EPOCHS = 6
BATCH_SIZE = 16


@dataclass
class PhantomRun:
    run: RunDir
    checkpoint: Path
    boxes_csv: Path
    images: Path


def write_run(root: Path, labels_csv: Path, images: Path, image_size: int, test_frac: float, val_frac: float,
              min_positives: int, seed: int = 0) -> RunDir:
    """An NIH-style collection -> manifest, patient split, shards (decoded once, in this process),
    stats.json, source.json and split_report.json: what ingest, split and preprocess write."""
    run = RunDir(root).ensure()
    manifest = ingest("nih", labels_csv, images).manifest
    splits = split_patients(manifest, test_frac=test_frac, val_frac=val_frac, min_positives=min_positives, seed=seed).splits
    manifest.to_parquet(run.manifest, index=False)
    splits.to_parquet(run.splits, index=False)
    merged = manifest.merge(splits[["image_id", "split"]], on="image_id")
    train_pixels = None
    for split, part in merged.groupby("split"):
        pixels = np.stack([decode_file(images / p, image_size).pixels for p in part["path"]])
        rows = part[["image_id", "patient_id", *FINDINGS]].copy()
        rows["image"] = [p.tobytes() for p in pixels]
        out = run.shards / f"split={split}"
        out.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(out / "part-0.parquet", index=False)
        train_pixels = pixels / 255.0 if split == "train" else train_pixels
    run.stats.write_text(json.dumps({"image_size": image_size, "mean": float(train_pixels.mean()),
                                     "std": float(train_pixels.std())}))
    run.source_json.write_text(json.dumps({"source": "nih", "label_file": str(labels_csv), "images": str(images)}))
    counts = merged.groupby("split").agg(images=("image_id", "size"), patients=("patient_id", "nunique"))
    run.split_report.write_text(json.dumps({"counts": {s: {k: int(v) for k, v in r.items()} for s, r in counts.iterrows()},
                                            "patients_in_two_splits": 0}))
    return run


def write_phantom_run(root: Path, n_patients: int = N_PATIENTS, image_size: int = IMAGE_SIZE, seed: int = 0) -> RunDir:
    """A phantom collection (with its box list beside the label file) as a run directory."""
    collection = make_collection(Path(root) / "phantoms", n_patients=n_patients, image_size=image_size, seed=seed)
    return write_run(root, collection.labels_csv, collection.images, image_size, 0.25, 0.2, 3, seed)


def _split_arrays(run: RunDir, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.read_parquet(run.shards / f"split={split}")
    images = np.frombuffer(b"".join(frame["image"]), np.uint8).reshape(len(frame), size, size)
    return torch.from_numpy(images.copy()), torch.from_numpy(frame[list(FINDINGS)].to_numpy(np.float32).clip(0, 1))


def train_tiny(run: RunDir, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, seed: int = 0) -> Path:
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
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = criterion(model(standardize(to_unit(images[idx]), mean, std)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            val_loss = float(criterion(model(standardize(to_unit(val_images), mean, std)), val_labels))
        history.append({"epoch": epoch + 1, "train_loss": total / len(images), "val_loss": val_loss})
    config = {"backbone": "resnet18", "epochs": epochs}
    best = run.train / "best"
    save_checkpoint(best, model, model_info(config, size, mean, std, epochs, {}))
    pd.DataFrame(history).to_csv(run.train / "history.csv", index=False)
    return best


_BUILT: dict[str, object] = {}  # one build per test session, whichever test modules import the fixtures


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory) -> PhantomRun:
    """One trained phantom run for every evaluation test of the session (built once)."""
    if "run" not in _BUILT:
        run = write_phantom_run(tmp_path_factory.mktemp("eval") / "run")
        checkpoint = train_tiny(run)
        phantoms = run.root / "phantoms"
        _BUILT["run"] = PhantomRun(run, checkpoint, phantoms / "BBox_List_2017.csv", phantoms / "images")
    return _BUILT["run"]


@dataclass
class Evaluated:
    phantom: PhantomRun
    evaluation: object  # evaluation.EvalResult
    explanation: object  # evaluation.ExplainResult
    progress: list[str]  # the lines evaluate_run reported as it went


@pytest.fixture(scope="session")
def evaluated_run(phantom_run) -> Evaluated:
    """The phantom run after ``evaluate_run`` and ``explain_run`` (what ``cxr report`` reads)."""
    if "evaluated" not in _BUILT:
        from evaluation import evaluate_run, explain_run

        progress: list[str] = []
        evaluation = evaluate_run(phantom_run.run, n_boot=200, seed=0, progress=progress.append)
        explanation = explain_run(phantom_run.run, max_images=6, max_boxed=30)
        _BUILT["evaluated"] = Evaluated(phantom_run, evaluation, explanation, progress)
    return _BUILT["evaluated"]
