"""Validation metrics: per-finding AUROC, undefined (NaN) where a finding has one class only."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from pipelines.labels import FINDINGS

AUROC_PREFIX = "val_auroc_"


def per_finding_auroc(labels: np.ndarray, scores: np.ndarray, findings=FINDINGS) -> dict[str, float]:
    """AUROC per finding over the known labels (-1 ignored). NaN, never 0.5, when the validation
    labels of a finding hold a single class: the AUROC is then undefined, not chance."""
    out: dict[str, float] = {}
    for j, name in enumerate(findings):
        known = labels[:, j] >= 0
        y = labels[known, j]
        out[name] = float(roc_auc_score(y, scores[known, j])) if len(np.unique(y)) == 2 else math.nan
    return out


def mean_auroc(aurocs: dict[str, float]) -> float:
    """Mean over the findings where AUROC is defined; NaN when none is."""
    values = [v for v in aurocs.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def auroc_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``val_mean_auroc`` and one ``val_auroc_<Finding>`` per finding, as reported each epoch."""
    per = per_finding_auroc(labels, scores)
    return {"val_mean_auroc": mean_auroc(per), **{AUROC_PREFIX + k: v for k, v in per.items()}}
