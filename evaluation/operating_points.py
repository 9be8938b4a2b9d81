"""Operating points: a threshold chosen on validation, then judged on test.

Choosing the threshold on the test split itself would flatter every figure below it; the
validation split is held out from training and is the honest place to pick it.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from evaluation.metrics import known

RULES = ("youden", "sensitivity")


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str = "youden",
                     target_sensitivity: float = 0.9) -> float | None:
    """The score at or above which an image is called positive, or None when the labels hold one
    class (no threshold can be judged).

    ``youden``: maximises sensitivity + specificity - 1 (Youden's J). ``sensitivity``: the highest
    threshold whose sensitivity reaches ``target_sensitivity`` (a screening operating point).
    """
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}: choose one of {', '.join(RULES)}")
    y, s = known(labels, scores)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(y, s)
    finite = np.isfinite(thresholds)  # scikit-learn's first threshold is +inf (nothing positive)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    reaching = np.flatnonzero(tpr >= target_sensitivity)
    return float(thresholds[reaching[0]])


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def operating_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    """Counts and rates at ``threshold`` (positive: score >= threshold). A rate whose denominator
    is zero (e.g. PPV when nothing is called positive) is None, not 0."""
    y, s = known(labels, scores)
    if threshold is None:
        return {"threshold": None, "tp": None, "fp": None, "tn": None, "fn": None, "sensitivity": None,
                "specificity": None, "ppv": None, "npv": None, "f1": None}
    called = s >= threshold
    tp = int(np.sum(called & (y == 1)))
    fp = int(np.sum(called & (y == 0)))
    tn = int(np.sum(~called & (y == 0)))
    fn = int(np.sum(~called & (y == 1)))
    return {
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
