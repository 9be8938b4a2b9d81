"""Subgroup performance: AUROC by any low-cardinality column (sex, age band, view, cohort, ...) with
patient-bootstrap intervals, the gap to the whole test set with a paired interval, and the model
against each baseline inside every subgroup.

A pooled figure with a tight interval can hide a cohort where the model knows nothing. All figures
come from one draw of patients per replicate (``paired_auroc_replicates``), so a gap or a
model-minus-baseline difference has an interval that accounts for the patients both sides share.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from evaluation.bootstrap import mean_replicates, paired_auroc_replicates, percentile_interval
from evaluation.metrics import auroc, nan_to_none
from pipelines.errors import UserInputError
from pipelines.formatting import estimate, number

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 200, "60+"))
DEFAULT_COLUMNS = ("sex", "age_band", "view", "cohort")
MAX_VALUES = 20  # more distinct values than this is an identifier, not a subgroup
MEAN = "mean"  # the ``finding`` of the mean-AUROC rows
MODEL = "model"
EVERYONE = "all"


def age_band(age: pd.Series) -> pd.Series:
    values = pd.to_numeric(age, errors="coerce")
    out = pd.Series(pd.NA, index=age.index, dtype="string")
    for low, high, name in AGE_BANDS:
        out[(values >= low) & (values < high)] = name
    return out


def column_values(frame: pd.DataFrame, column: str) -> pd.Series:
    """The values that define ``column``'s subgroups (``age_band`` is derived from ``age``)."""
    if column == "age_band":
        return age_band(frame["age"])
    return frame[column].astype("string")


def subgroup_columns(frame: pd.DataFrame, requested: list[str] | None = None) -> list[str]:
    """The columns to break results down by: ``requested``, checked, else every default present."""
    def present(column: str) -> bool:
        return ("age" in frame) if column == "age_band" else column in frame

    if requested is None:
        return [c for c in DEFAULT_COLUMNS if present(c) and column_values(frame, c).notna().any()]
    for column in requested:
        if not present(column):
            raise UserInputError(f"--subgroups: no column {column!r} in the test predictions or the manifest "
                             f"(available: {', '.join(sorted(c for c in frame.columns if not c.startswith('prob_')))})")
        n = column_values(frame, column).nunique(dropna=True)
        if n > MAX_VALUES:
            raise UserInputError(f"--subgroups: column {column!r} has {n} distinct values (at most {MAX_VALUES}): "
                             "it identifies records rather than groups")
    return list(dict.fromkeys(requested))


def _masks(frame: pd.DataFrame, columns: list[str]) -> dict[str, tuple[str, str, np.ndarray]]:
    out = {}
    for column in columns:
        values = column_values(frame, column)
        for value in sorted(values.dropna().unique(), key=str):
            mask = (values == value).fillna(False).to_numpy(bool)
            if mask.any():
                out[f"{column}={value}"] = (column, str(value), mask)
    return out


def _mean_gap(reps: dict, score: str, key: str, defined: list[int]) -> np.ndarray:
    return mean_replicates(reps[(score, key)], defined) - mean_replicates(reps[(score, EVERYONE)], defined)


def subgroup_table(frame: pd.DataFrame, findings: list[str], columns: list[str] | None = None,
                   baselines: dict[str, np.ndarray] | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (attribute, group, finding) plus a ``mean`` row per group.

    ``frame``: test predictions with the label columns, ``prob_<finding>``, ``patient_id`` and the
    subgroup columns. ``gap`` = group AUROC - whole-test-set AUROC (for the mean: over the findings
    defined in both, so both sides average the same findings), with a paired interval. For each
    baseline (name -> ``(n, F)`` scores, NaN = not fitted, scored as a constant): its AUROC in the
    group and ``vs_<name>`` = model - baseline with a paired interval.
    """
    baselines = baselines or {}
    labels = frame[findings].to_numpy(np.int8)
    probs = frame[[f"prob_{f}" for f in findings]].to_numpy(np.float64)
    patients = frame["patient_id"].astype(str).to_numpy()
    groups = _masks(frame, subgroup_columns(frame, columns))
    scores = {MODEL: probs, **{name: np.nan_to_num(b, nan=0.5) for name, b in baselines.items()}}
    masks = {EVERYONE: np.ones(len(frame), bool), **{k: m for k, (_, _, m) in groups.items()}}
    reps = paired_auroc_replicates(labels, scores, patients, masks, n_boot, seed)
    overall = [auroc(labels[:, j], probs[:, j]) for j in range(len(findings))]
    rows = []
    for key, (column, value, mask) in groups.items():
        base = {"attribute": column, "group": value, "n_images": int(mask.sum()), "n_patients": int(len(np.unique(patients[mask])))}
        defined = []
        for j, name in enumerate(findings):
            value_j = auroc(labels[mask, j], probs[mask, j])
            if not math.isnan(value_j) and not math.isnan(overall[j]):
                defined.append(j)
            ci, gap_ci = percentile_interval(reps[(MODEL, key)][:, j]), percentile_interval(reps[(MODEL, key)][:, j] - reps[(MODEL, EVERYONE)][:, j])
            row = {**base, "finding": name, "n_positive": int((labels[mask, j] == 1).sum()), "auroc": value_j,
                   "ci_low": ci.low, "ci_high": ci.high, "n_boot_valid": ci.n_valid,
                   "gap": value_j - overall[j], "gap_ci_low": gap_ci.low, "gap_ci_high": gap_ci.high}
            for b in baselines:
                b_value = auroc(labels[mask, j], scores[b][mask, j])
                diff_ci = percentile_interval(reps[(MODEL, key)][:, j] - reps[(b, key)][:, j])
                row |= {f"baseline_{b}": b_value, f"vs_{b}": value_j - b_value, f"vs_{b}_ci_low": diff_ci.low, f"vs_{b}_ci_high": diff_ci.high}
            rows.append(row)
        mean = float(np.mean([rows[-len(findings) + j]["auroc"] for j in defined])) if defined else math.nan
        overall_same = float(np.mean([overall[j] for j in defined])) if defined else math.nan
        ci = percentile_interval(mean_replicates(reps[(MODEL, key)], defined))
        gap_ci = percentile_interval(_mean_gap(reps, MODEL, key, defined))
        row = {**base, "finding": MEAN, "n_positive": int((labels[mask] == 1).any(axis=1).sum()), "auroc": mean,
               "ci_low": ci.low, "ci_high": ci.high, "n_boot_valid": ci.n_valid,
               "gap": mean - overall_same, "gap_ci_low": gap_ci.low, "gap_ci_high": gap_ci.high}
        for b in baselines:
            b_mean = float(np.mean([auroc(labels[mask, j], scores[b][mask, j]) for j in defined])) if defined else math.nan
            diff_ci = percentile_interval(mean_replicates(reps[(MODEL, key)], defined) - mean_replicates(reps[(b, key)], defined))
            row |= {f"baseline_{b}": b_mean, f"vs_{b}": mean - b_mean, f"vs_{b}_ci_low": diff_ci.low, f"vs_{b}_ci_high": diff_ci.high}
        rows.append(row)
    return pd.DataFrame(rows)


def _figures(row: pd.Series, baselines: list[str]) -> dict:
    out = {key: nan_to_none(row[key]) for key in ("auroc", "ci_low", "ci_high", "gap", "gap_ci_low", "gap_ci_high")}
    out["n_positive"] = int(row["n_positive"])
    for b in baselines:
        out.setdefault("baselines", {})[b] = {"auroc": nan_to_none(row[f"baseline_{b}"]), "diff": nan_to_none(row[f"vs_{b}"]),
                                              "diff_ci_low": nan_to_none(row[f"vs_{b}_ci_low"]), "diff_ci_high": nan_to_none(row[f"vs_{b}_ci_high"])}
    return out


def subgroups_json(table: pd.DataFrame, baselines: list[str]) -> dict:
    """``metrics.json``'s ``subgroups``: column -> value -> {mean_auroc, ci_low, ci_high, gap,
    gap_ci_low, gap_ci_high, n_images, n_patients, per_finding, baselines}."""
    out: dict = {}
    for (column, value), rows in table.groupby(["attribute", "group"], sort=False):
        mean = _figures(rows[rows["finding"] == MEAN].iloc[0], baselines)
        entry = {"mean_auroc": mean.pop("auroc"), **mean, "n_images": int(rows["n_images"].iloc[0]),
                 "n_patients": int(rows["n_patients"].iloc[0]),
                 "per_finding": {r["finding"]: _figures(r, baselines) for _, r in rows[rows["finding"] != MEAN].iterrows()}}
        out.setdefault(column, {})[value] = entry
    return out


def below_overall(table: pd.DataFrame, overall_mean: float | None) -> list[str]:
    """A sentence for every subgroup whose interval for the mean lies wholly below the overall
    point estimate: the model is worse there, beyond what the sample explains."""
    if overall_mean is None or table.empty:
        return []
    means = table[(table["finding"] == MEAN) & table["ci_high"].notna()]
    return [f"On {r.attribute} {r.group} ({r.n_images} images, {r.n_patients} patients) the model's mean AUROC is "
            f"{estimate(r.auroc, r.ci_low, r.ci_high)}, well below {number(overall_mean)} overall"
            for r in means.itertuples() if r.ci_high < overall_mean]


def not_beating_baselines(table: pd.DataFrame, baselines: list[str], words: dict[str, str]) -> list[str]:
    """A sentence for every subgroup where the model is not shown to beat a baseline (the paired
    interval of model - baseline for the mean includes 0 or lies below it)."""
    means = table[table["finding"] == MEAN]
    out = []
    for r in means.itertuples():
        for b in baselines:
            low = getattr(r, f"vs_{b}_ci_low")
            if math.isnan(low) or low <= 0:
                out.append(f"On {r.attribute} {r.group} ({r.n_images} images) the model is not shown to beat {words.get(b, b)} "
                           f"(mean AUROC {number(r.auroc)} vs {number(getattr(r, f'baseline_{b}'))})")
    return out
