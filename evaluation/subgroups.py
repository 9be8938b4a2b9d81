"""Subgroup performance: AUROC by sex, age band and view, with patient-bootstrap intervals and the
gap to the whole test set. A model can look good on average and fail one group; AP (bedside,
sicker patients) against PA views is also the view shift the collection allows us to measure."""
from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation.bootstrap import bootstrap_auroc, mean_replicates, percentile_interval
from evaluation.metrics import auroc

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 200, "60+"))
VIEWS = ("PA", "AP")
MEAN = "mean"  # the ``finding`` of the mean-AUROC rows


def age_band(age: pd.Series) -> pd.Series:
    values = pd.to_numeric(age, errors="coerce")
    out = pd.Series(pd.NA, index=age.index, dtype="string")
    for low, high, name in AGE_BANDS:
        out[(values >= low) & (values < high)] = name
    return out


def groups_of(frame: pd.DataFrame) -> list[tuple[str, str, np.ndarray]]:
    """(attribute, group, row mask) for every subgroup the frame's columns allow."""
    out = []
    if "sex" in frame:
        out += [("sex", s, (frame["sex"] == s).to_numpy(bool)) for s in ("F", "M")]
    if "age" in frame:
        bands = age_band(frame["age"])
        out += [("age", name, (bands == name).fillna(False).to_numpy(bool)) for _, _, name in AGE_BANDS]
    if "view" in frame:
        out += [("view", v, (frame["view"] == v).fillna(False).to_numpy(bool)) for v in VIEWS]
    return [(a, g, m) for a, g, m in out if m.any()]


def _rows(attribute: str, group: str, labels: np.ndarray, probs: np.ndarray, patients: np.ndarray,
          findings: list[str], overall: dict[str, float], n_boot: int, seed: int) -> list[dict]:
    replicates = bootstrap_auroc(labels, probs, patients, n_boot, seed)
    base = {"attribute": attribute, "group": group, "n_images": len(labels), "n_patients": len(np.unique(patients))}
    rows, defined = [], []
    for j, name in enumerate(findings):
        value = auroc(labels[:, j], probs[:, j])
        ci = percentile_interval(replicates[:, j])
        if not np.isnan(value) and not np.isnan(overall.get(name, np.nan)):
            defined.append(j)
        rows.append({**base, "finding": name, "n_positive": int((labels[:, j] == 1).sum()), "auroc": value,
                     "ci_low": ci.low, "ci_high": ci.high, "n_boot_valid": ci.n_valid,
                     "gap": value - overall.get(name, np.nan)})
    mean = float(np.mean([rows[j]["auroc"] for j in defined])) if defined else np.nan
    overall_same = float(np.mean([overall[findings[j]] for j in defined])) if defined else np.nan
    ci = percentile_interval(mean_replicates(replicates, defined))
    rows.append({**base, "finding": MEAN, "n_positive": int((labels == 1).any(axis=1).sum()), "auroc": mean,
                 "ci_low": ci.low, "ci_high": ci.high, "n_boot_valid": ci.n_valid, "gap": mean - overall_same})
    return rows


def subgroup_table(frame: pd.DataFrame, findings: list[str], overall: dict[str, float], n_boot: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """One row per (attribute, group, finding) plus a ``mean`` row per group.

    ``frame``: the test predictions with label columns, ``prob_<finding>``, ``patient_id`` and any
    of ``sex``, ``age``, ``view``. ``gap`` = group AUROC - overall AUROC (for the mean: over the
    findings defined in the group, so both sides average the same findings).
    """
    labels = frame[findings].to_numpy(np.int8)
    probs = frame[[f"prob_{f}" for f in findings]].to_numpy(np.float64)
    patients = frame["patient_id"].astype(str).to_numpy()
    rows = []
    for attribute, group, mask in groups_of(frame):
        rows += _rows(attribute, group, labels[mask], probs[mask], patients[mask], findings, overall, n_boot, seed)
    return pd.DataFrame(rows)
