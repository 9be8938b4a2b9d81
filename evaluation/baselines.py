"""Simple baselines beside the model, scored on the same test patients with the same bootstrap
replicates, so that "model minus baseline" has a paired interval.

A mean AUROC of 0.68 says little by itself: where age, sex and view predict the findings as well as
the pixels do (a cohort with its own case mix, say), the model may have learned the cohort rather
than the disease. Two baselines, both fit on the train split with scikit-learn:

- ``metadata``: a logistic regression per finding on age, sex and view (whichever are present);
- ``image_statistics``: a logistic regression per finding on a 32x32 downsample of the
  preprocessed image, reduced with PCA to 64 dimensions: what coarse intensity layout alone knows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from evaluation.bootstrap import bootstrap_auroc, mean_replicates, percentile_interval
from evaluation.metrics import auroc, nan_to_none
from pipelines.labels import FINDINGS
from pipelines.shards import IMAGE_COLUMN, Rows, images_from_column, scan_rows

METADATA = "metadata"
IMAGE_STATISTICS = "image_statistics"
THUMBNAIL_SIDE = 32
PCA_COMPONENTS = 64
WORDS = {METADATA: "a metadata-only baseline (age, sex, view)", IMAGE_STATISTICS: "an image-statistics baseline (32x32 thumbnail + PCA)"}


@dataclass
class Baseline:
    name: str
    probs: np.ndarray  # (n_test, F); NaN columns where the train split holds one class only
    features: list[str]  # what the baseline saw, in words


def metadata_matrix(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Age (standardized, median-imputed, with a missing flag) and one-hot sex and view, encoded
    with categories learned on train only; columns absent from either frame are left out."""
    parts_train, parts_test, used = [], [], []
    if "age" in train and "age" in test:
        age_train = pd.to_numeric(train["age"], errors="coerce").astype(float)
        age_test = pd.to_numeric(test["age"], errors="coerce").astype(float)
        fill = float(age_train.median()) if age_train.notna().any() else 0.0
        scaler = StandardScaler().fit(age_train.fillna(fill).to_numpy()[:, None])
        for age, parts in ((age_train, parts_train), (age_test, parts_test)):
            parts.append(scaler.transform(age.fillna(fill).to_numpy()[:, None]))
            parts.append(age.isna().to_numpy(float)[:, None])
        used.append("age")
    categorical = [c for c in ("sex", "view") if c in train and c in test]
    if categorical:
        encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
        encoder.fit(train[categorical].astype(str).fillna("?"))
        parts_train.append(encoder.transform(train[categorical].astype(str).fillna("?")))
        parts_test.append(encoder.transform(test[categorical].astype(str).fillna("?")))
        used += categorical
    if not used:
        return np.zeros((len(train), 0)), np.zeros((len(test), 0)), []
    return np.hstack(parts_train), np.hstack(parts_test), used


def thumbnails(images: np.ndarray, side: int = THUMBNAIL_SIDE, chunk: int = 1024) -> np.ndarray:
    """``(n, S, S)`` uint8 images as ``(n, side*side)`` float32 in 0..1: block means when ``S`` is a
    multiple of ``side``, else nearest sampling of the block centres (cheap and deterministic).
    Float32 and ``chunk`` images at a time: 4 KB per image, no float64 copy of a whole split (at
    64 px that would be twice the split's own pixels)."""
    images = np.asarray(images)
    n, size = images.shape[0], images.shape[1]
    out = np.empty((n, side * side), np.float32)
    for start in range(0, n, chunk):
        part = images[start:start + chunk]
        if size % side == 0:
            k = size // side
            small = part.reshape(len(part), side, k, side, k).mean(axis=(2, 4))
        else:
            index = ((np.arange(side) + 0.5) * size / side).astype(int)
            small = part[:, index][:, :, index].astype(np.float64)
        out[start:start + len(part)] = small.reshape(len(part), side * side) / 255.0
    return out


def split_thumbnails(shards: Path, rows: Rows, image_size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The ids and labels of ``rows`` (a split, or image ids from any split) with each image's
    thumbnail, read batch by batch: the baseline needs 32x32 per image, so memory stays small
    however large the training split is."""
    frames, small = [], []
    for batch in scan_rows(shards, rows, ["image_id", "patient_id", IMAGE_COLUMN, *FINDINGS], batch_size=256).to_batches():
        table = batch.to_pandas()
        small.append(thumbnails(images_from_column(table.pop(IMAGE_COLUMN).to_list(), image_size)))
        frames.append(table)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", "patient_id", *FINDINGS])
    frame["image_id"] = frame["image_id"].astype(str)
    return frame, (np.concatenate(small) if small else np.zeros((0, THUMBNAIL_SIDE * THUMBNAIL_SIDE), np.float32))


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, reduce: int | None, seed: int) -> np.ndarray:
    """Per finding: a logistic regression on the rows whose label is known (-1 uncertain is left
    out); NaN where the train split holds one class only (no model can be fit)."""
    probs = np.full((len(x_test), y_train.shape[1]), np.nan)
    if x_train.shape[1] == 0:
        return probs
    steps = [StandardScaler()]
    if reduce is not None:
        steps.append(PCA(n_components=min(reduce, x_train.shape[1], max(len(x_train) - 1, 1)), random_state=seed))
    transform = make_pipeline(*steps).fit(x_train)
    z_train, z_test = transform.transform(x_train), transform.transform(x_test)
    for j in range(y_train.shape[1]):
        known = y_train[:, j] >= 0
        y = y_train[known, j]
        if len(np.unique(y)) < 2:
            continue
        model = LogisticRegression(max_iter=2000, class_weight="balanced")
        probs[:, j] = model.fit(z_train[known], y).predict_proba(z_test)[:, 1]
    return probs


def fit_baselines(train: pd.DataFrame, train_labels: np.ndarray, train_thumbs: np.ndarray | None,
                  test: pd.DataFrame, test_thumbs: np.ndarray | None, seed: int = 0) -> list[Baseline]:
    """Both baselines fit on ``train`` and scored on ``test`` (frames with any of age/sex/view;
    thumbnails from :func:`thumbnails`). A baseline whose inputs are missing is left out."""
    out = []
    x_train, x_test, used = metadata_matrix(train, test)
    if used:
        out.append(Baseline(METADATA, _fit_predict(x_train, train_labels, x_test, None, seed), used))
    if train_thumbs is not None and test_thumbs is not None and len(train_thumbs):
        out.append(Baseline(IMAGE_STATISTICS, _fit_predict(train_thumbs, train_labels, test_thumbs, PCA_COMPONENTS, seed),
                            [f"{THUMBNAIL_SIDE}x{THUMBNAIL_SIDE} thumbnail, PCA {PCA_COMPONENTS}"]))
    return out


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    ci = percentile_interval(values)
    return nan_to_none(ci.low), nan_to_none(ci.high)


def compare(labels: np.ndarray, model_probs: np.ndarray, patients: np.ndarray, findings: list[str],
            baseline: Baseline, n_boot: int = 1000, seed: int = 0) -> dict:
    """The baseline's AUROC per finding and mean with intervals, and model - baseline with paired
    intervals: both are scored on the same bootstrap replicates (same seed, same patients)."""
    model_reps = bootstrap_auroc(labels, model_probs, patients, n_boot, seed)
    scores = np.nan_to_num(baseline.probs, nan=0.5)  # a constant score: AUROC 0.5, what "no model" knows
    base_reps = bootstrap_auroc(labels, scores, patients, n_boot, seed)
    per_finding, defined = {}, []
    for j, name in enumerate(findings):
        known = labels[:, j] >= 0
        value, model_value = auroc(labels[known, j], scores[known, j]), auroc(labels[known, j], model_probs[known, j])
        if math.isnan(value) or math.isnan(model_value):
            per_finding[name] = {"auroc": None, "ci_low": None, "ci_high": None, "diff": None, "diff_ci_low": None, "diff_ci_high": None}
            continue
        defined.append(j)
        low, high = _interval(base_reps[:, j])
        d_low, d_high = _interval(model_reps[:, j] - base_reps[:, j])
        per_finding[name] = {"auroc": value, "ci_low": low, "ci_high": high, "diff": model_value - value,
                             "diff_ci_low": d_low, "diff_ci_high": d_high, "fitted": bool(not np.isnan(baseline.probs[:, j]).all())}
    mean = float(np.mean([per_finding[findings[j]]["auroc"] for j in defined])) if defined else math.nan
    model_mean = float(np.mean([auroc(labels[labels[:, j] >= 0, j], model_probs[labels[:, j] >= 0, j]) for j in defined])) if defined else math.nan
    low, high = _interval(mean_replicates(base_reps, defined))
    d_low, d_high = _interval(mean_replicates(model_reps, defined) - mean_replicates(base_reps, defined))
    return {"mean_auroc": nan_to_none(mean), "ci_low": low, "ci_high": high, "diff": nan_to_none(model_mean - mean),
            "diff_ci_low": d_low, "diff_ci_high": d_high, "features": baseline.features, "findings": [findings[j] for j in defined],
            "per_finding": per_finding}


def not_shown_to_beat(comparison: dict) -> bool:
    """The paired interval of model - baseline includes 0 or lies below it (or cannot be formed)."""
    low = comparison.get("diff_ci_low")
    return low is None or low <= 0


def verdict(name: str, comparison: dict) -> str | None:
    """One line in words when the model is not shown to beat ``name``; None when it is."""
    if not not_shown_to_beat(comparison):
        return None
    diff, low, high = comparison.get("diff"), comparison.get("diff_ci_low"), comparison.get("diff_ci_high")
    figures = f" (model - baseline mean AUROC {diff:+.3f} [{low:+.3f}, {high:+.3f}])" if None not in (diff, low, high) else ""
    return f"not shown to beat {WORDS.get(name, name)}{figures}"
