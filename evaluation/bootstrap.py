"""Bootstrap confidence intervals that resample patients, not images.

Images of one patient are correlated (same anatomy, often the same chronic finding), so resampling
images treats them as independent evidence and gives intervals that are too narrow. Each replicate
draws the test patients with replacement and takes all of a drawn patient's images, as often as
the patient was drawn; that is an integer weight per image, which ``weighted_auroc`` scores for
all replicates at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evaluation.metrics import weighted_auroc

CHUNK = 250  # replicates scored per call: bounds memory at CHUNK x images floats per finding


@dataclass(frozen=True)
class Interval:
    low: float  # NaN when no replicate was valid
    high: float
    n_valid: int  # replicates in which the figure was defined (both classes present)
    n_boot: int


def patient_weights(patients: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n_images)`` integer weights: how often each image's patient was drawn.

    Drawing P patients with replacement gives multinomial counts with equal probabilities.
    """
    _, index = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    n_patients = int(index.max()) + 1 if len(index) else 0
    counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / max(n_patients, 1)), size=n_boot)
    return counts[:, index]


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, patients: np.ndarray, n_boot: int = 1000,
                    seed: int = 0) -> np.ndarray:
    """AUROC replicates ``(n_boot, n_findings)`` for labels/scores ``(n, F)``; NaN where a
    replicate holds one class of a finding. Uncertain labels (-1) get weight 0."""
    everyone = np.ones(len(np.asarray(labels)), dtype=bool)
    return paired_auroc_replicates(labels, {"": scores}, patients, {"": everyone}, n_boot, seed)[("", "")]


def paired_auroc_replicates(labels: np.ndarray, scores: dict[str, np.ndarray], patients: np.ndarray,
                            masks: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
    """AUROC replicates ``(n_boot, F)`` for every (score set, row mask) pair, all from ONE draw of
    patients per replicate: a subgroup's replicate is the whole test set's replicate restricted to
    the subgroup's rows. Differences between any two of them (model - baseline, subgroup - all)
    are therefore paired, and their percentile intervals account for the shared patients.
    The same ``seed`` gives the same draws as :func:`bootstrap_auroc`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = {(s, m): np.empty((n_boot, labels.shape[1])) for s in scores for m in masks}
    as_float = {s: np.asarray(v, dtype=np.float64) for s, v in scores.items()}
    for start in range(0, n_boot, CHUNK):
        weights = patient_weights(patients, min(CHUNK, n_boot - start), rng)
        rows = slice(start, start + len(weights))
        for j in range(labels.shape[1]):
            known = labels[:, j] >= 0
            for m, mask in masks.items():
                keep = known & np.asarray(mask, dtype=bool)
                for s, values in as_float.items():
                    out[(s, m)][rows, j] = weighted_auroc(labels[keep, j], values[keep, j], weights[:, keep])
    return out


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval over the valid (non-NaN) replicates of one figure."""
    values = np.asarray(replicates, dtype=np.float64)
    valid = values[~np.isnan(values)]
    if len(valid) == 0:
        return Interval(math.nan, math.nan, 0, len(values))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(valid, [tail, 100.0 - tail])
    return Interval(float(low), float(high), len(valid), len(values))


def mean_replicates(replicates: np.ndarray, columns: list[int]) -> np.ndarray:
    """Mean AUROC of each replicate over ``columns`` (the findings defined on the full test set);
    NaN where any of them is undefined in the replicate, so every valid replicate averages the
    same findings as the point estimate."""
    if not columns:
        return np.full(len(replicates), np.nan)
    return np.asarray(replicates)[:, columns].mean(axis=1)
