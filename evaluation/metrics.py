"""Discrimination metrics for one finding: AUROC (also weighted, for the bootstrap) and average precision.

A metric that needs both classes is NaN when the labels hold one class only: an undefined AUROC is
reported as undefined, never as 0.5 (chance) or 0. Labels of -1 (uncertain) are left out by the
callers through ``known``.
"""
from __future__ import annotations

import math

import numpy as np


def known(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (label, score) pairs whose label is 0 or 1 (an uncertain -1 is neither)."""
    labels = np.asarray(labels)
    keep = labels >= 0
    return labels[keep].astype(np.int8), np.asarray(scores, dtype=np.float64)[keep]


def weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under each row of ``weights`` ``(B, n)``: Mann-Whitney U with ties counted as half.

    An integer weight k counts the image k times, so one call scores all bootstrap replicates at
    once: the sort and the tie groups depend on the scores only and are shared. Returns ``(B,)``,
    NaN where the positives or the negatives carry no weight.
    """
    y = np.asarray(labels) == 1
    s = np.asarray(scores, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.array([], dtype=np.intp)
    if len(starts) == 0:
        return np.full(w.shape[0], np.nan)
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)  # (B, tie groups)
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve over the known labels; NaN when a class is missing."""
    y, s = known(labels, scores)
    return float(weighted_auroc(y, s, np.ones((1, len(y))))[0])


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn defines it: sum over score thresholds of
    (recall step) x precision, ties taken together. NaN without positives (no recall to average)."""
    y, s = known(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(y)[last]
    predicted = last + 1
    recall = tp / n_pos
    precision = tp / predicted
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def prevalence(labels: np.ndarray) -> float:
    """Fraction positive among the known labels; NaN when no label is known."""
    y = np.asarray(labels)
    y = y[y >= 0]
    return float(y.mean()) if len(y) else math.nan


def nan_to_none(value: float | None) -> float | None:
    """JSON has no NaN: an undefined figure is written as null."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
