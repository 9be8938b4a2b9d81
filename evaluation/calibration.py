"""Calibration: do predicted probabilities match observed frequencies?

A model trained with a weighted loss or resampling ranks images well but overstates probabilities;
the reliability table and the expected calibration error (ECE) show by how much.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from evaluation.metrics import known

N_BINS = 10


def reliability_table(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-width probability bins: ``low``, ``high``, ``count``, ``mean_predicted`` and
    ``observed`` (fraction positive). Empty bins have count 0 and NaN means. A probability of
    exactly 1 falls in the last bin."""
    y, p = known(labels, probs)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=n_bins) / count
        observed = np.bincount(index, weights=y, minlength=n_bins) / count
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "count": count,
                         "mean_predicted": mean_predicted, "observed": observed})


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE = sum over bins of (bin share of images) x |observed - mean predicted|. NaN with no labels."""
    table = reliability_table(labels, probs, n_bins)
    total = int(table["count"].sum())
    if total == 0:
        return math.nan
    filled = table[table["count"] > 0]
    return float(np.sum(filled["count"] / total * np.abs(filled["observed"] - filled["mean_predicted"])))
