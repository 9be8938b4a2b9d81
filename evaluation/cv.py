"""Cross-validation results: each fold's held-out images scored by that fold's best checkpoint,
pooled out of fold, and judged the way ``cxr evaluate`` judges the test split.

Every figure comes from the functions ``evaluation.evaluate`` uses, fed the out-of-fold (OOF) frame
instead of the test split: per-finding AUROC with a patient-bootstrap interval and the mean over the
defined findings; both baselines with the paired model - baseline interval and the same verdict
words; subgroups (cohort included) with gaps and the model against each baseline inside them. The
baselines are cross-validated on the same folds: each is fit on a fold's training images and scores
that fold's held-out images, and the held-out scores are pooled like the model's.

Pooling scores of K different models into one AUROC assumes they are on a comparable scale (they
share the recipe and the data); the per-fold means ± sd beside it show how much the folds differ.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.baselines import Baseline, compare, fit_baselines, split_thumbnails, verdict
from evaluation.bootstrap import bootstrap_auroc
from evaluation.evaluate import auroc_figures, failure_lines, mean_figures, with_meta
from evaluation.inference import load_rows, predict_arrays, prediction_frame
from evaluation.metrics import auroc, nan_to_none
from evaluation.subgroups import MEAN, subgroup_columns, subgroup_table, subgroups_json
from pipelines.atomic import write_json, write_text
from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from pipelines.lineage import write_parquet
from pipelines.rundir import RunDir

PREDICTIONS = "predictions.parquet"  # a fold's held-out predictions, in its fold folder
OOF_FILE = "oof_predictions.parquet"
METRICS_FILE = "metrics.json"
SUBGROUPS_FILE = "subgroups.csv"
RESULTS_FILE = "results.md"
TITLES = {"metadata": "metadata (age, sex, view)", "image_statistics": "image statistics (32x32 + PCA)"}


def score_fold(run: RunDir, out_dir: Path, fold: int, ids: list[str]) -> pd.DataFrame:
    """Score fold ``fold``'s held-out images ``ids`` with its best checkpoint (``out_dir/best``);
    write ``out_dir/predictions.parquet`` (the contract columns of ``eval/predictions.parquet``
    plus ``fold``) and return it."""
    from trainers.checkpoint import load_checkpoint  # torch only when scoring

    model, info = load_checkpoint(Path(out_dir) / "best")
    findings = list(info["findings"])
    if findings != list(FINDINGS):
        raise UserInputError(f"{out_dir}/best predicts {findings}, not the 14 findings of the shards")
    data = load_rows(run, ids, int(info["image_size"]))
    frame = prediction_frame(data, predict_arrays(model, info, data.images), findings).assign(fold=np.int64(fold))
    write_parquet(frame, Path(out_dir) / PREDICTIONS)
    return frame


def mean_auroc(frame: pd.DataFrame, probs: np.ndarray | None = None, findings: list[str] = FINDINGS) -> tuple[float, dict[str, float]]:
    """Mean AUROC over the findings defined in ``frame`` (scores: ``probs`` or its prob_ columns)
    and the per-finding values (NaN where undefined)."""
    scores = frame[[f"prob_{f}" for f in findings]].to_numpy(np.float64) if probs is None else np.asarray(probs, np.float64)
    per = {f: auroc(frame[f].to_numpy(), np.nan_to_num(scores[:, j], nan=0.5)) for j, f in enumerate(findings)}
    defined = [v for v in per.values() if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else math.nan), per


def cv_baselines(run: RunDir, oof: pd.DataFrame, roles: pd.DataFrame, image_size: int, seed: int = 0) -> list[Baseline]:
    """Both baselines cross-validated on the folds of ``roles``: fit on each fold's training images
    (as ``cxr evaluate`` fits them on the train split), scored on its held-out images, pooled in the
    row order of ``oof``. A fold whose training images hold one class of a finding leaves NaN there."""
    frame, thumbs = split_thumbnails(run.shards, list(oof["image_id"]), image_size)
    frame = with_meta(frame, run)
    where = pd.Series(np.arange(len(frame)), index=frame["image_id"].astype(str))
    out_row = pd.Series(np.arange(len(oof)), index=oof["image_id"].astype(str))
    pooled: dict[str, np.ndarray] = {}
    features: dict[str, list[str]] = {}
    for fold, part in roles.groupby("fold"):
        train = where[part.loc[part["role"] == "train", "image_id"].astype(str)].to_numpy()
        held_ids = part.loc[part["role"] == "held_out", "image_id"].astype(str)
        held = where[held_ids].to_numpy()
        fitted = fit_baselines(frame.iloc[train], frame.iloc[train][list(FINDINGS)].to_numpy(np.int8), thumbs[train],
                               frame.iloc[held], thumbs[held], seed)
        for b in fitted:
            pooled.setdefault(b.name, np.full((len(oof), len(FINDINGS)), np.nan))[out_row[held_ids].to_numpy()] = b.probs
            features[b.name] = b.features
    return [Baseline(name, probs, features[name]) for name, probs in pooled.items()]


def _per_fold(oof: pd.DataFrame, baselines: list[Baseline], fold_info: dict[int, dict]) -> list[dict]:
    rows = []
    for fold, part in oof.groupby("fold", sort=True):
        mask = (oof["fold"] == fold).to_numpy()
        mean, per = mean_auroc(part)
        rows.append({
            "fold": int(fold), "n_images": int(len(part)), "n_patients": int(part["patient_id"].nunique()),
            "mean_auroc": nan_to_none(mean), "per_finding": {f: nan_to_none(v) for f, v in per.items()},
            "baselines": {b.name: nan_to_none(mean_auroc(part, b.probs[mask])[0]) for b in baselines},
            **fold_info.get(int(fold), {}),
        })
    return rows


def _spread(mean_values: list[float]) -> dict:
    values = [v for v in mean_values if v is not None]
    return {"mean": nan_to_none(float(np.mean(values))) if values else None,
            "sd": nan_to_none(float(np.std(values, ddof=1))) if len(values) > 1 else None, "n": len(values)}


def shortfall_lines(shortfalls: list[dict]) -> list[str]:
    """In words, each finding whose positives could not be spread over every fold."""
    out = []
    for s in shortfalls:
        if s["positives"] == 0:
            out.append(f"{s['finding']}: no positive image in the data, so no fold can score it")
        else:
            out.append(f"{s['finding']}: {s['positives']} positive image(s) of {s['patients']} patient(s), so only "
                       f"{s['folds_with_positives']} of {s['folds']} folds hold a positive")
    return out


def cv_metrics(oof: pd.DataFrame, baselines: list[Baseline], fold_info: dict[int, dict], n_boot: int = 1000, seed: int = 0,
               subgroups: list[str] | None = None) -> tuple[dict, pd.DataFrame | None]:
    """``metrics.json`` of a cross-validation from the OOF frame (contract columns, ``fold`` and the
    manifest's columns), the pooled baselines and what each fold's run reported."""
    findings = list(FINDINGS)
    labels = oof[findings].to_numpy(np.int8)
    probs = oof[[f"prob_{f}" for f in findings]].to_numpy(np.float64)
    patients = oof["patient_id"].astype(str).to_numpy()
    replicates = bootstrap_auroc(labels, probs, patients, n_boot, seed)
    per_finding = {name: auroc_figures(labels[:, j], probs[:, j], replicates[:, j]) for j, name in enumerate(findings)}
    mean = mean_figures(per_finding, replicates, findings)
    comparisons = {b.name: compare(labels, probs, patients, findings, b, n_boot, seed) for b in baselines}
    per_fold = _per_fold(oof, baselines, fold_info)
    for b in baselines:
        comparisons[b.name]["per_fold"] = _spread([f["baselines"][b.name] for f in per_fold])
    columns = subgroup_columns(oof, subgroups)
    groups = subgroup_table(oof, findings, columns, {b.name: b.probs for b in baselines}, n_boot=n_boot, seed=seed) if columns else None
    metrics = {
        "n_images": int(len(oof)), "n_patients": int(oof["patient_id"].nunique()), "folds": int(oof["fold"].nunique()),
        "pooled_from": "out-of-fold predictions: every image scored once, by the model of the fold that held it out",
        "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile"},
        "per_finding": per_finding,
        "mean": mean,
        "mean_auroc": mean["auroc"],
        "per_fold": per_fold,
        "fold_mean_auroc": _spread([f["mean_auroc"] for f in per_fold]),
        "baselines": comparisons,
        "subgroups": subgroups_json(groups, [b.name for b in baselines]) if groups is not None else {},
        "warnings": failure_lines(mean, comparisons, groups),
    }
    return metrics, groups


def write_cv_outputs(run: RunDir, oof: pd.DataFrame, metrics: dict, groups: pd.DataFrame | None) -> dict[str, Path]:
    """``oof_predictions.parquet``, ``subgroups.csv``, ``results.md`` and (last) ``metrics.json``
    in ``<run>/cv``, each written atomically."""
    out = run.cv
    files = {"oof_predictions": out / OOF_FILE, "results": out / RESULTS_FILE, "metrics": out / METRICS_FILE}
    write_parquet(oof, files["oof_predictions"])
    if groups is not None:
        files["subgroups"] = out / SUBGROUPS_FILE
        tmp = out / f".{SUBGROUPS_FILE}.staging"
        groups.to_csv(tmp, index=False)
        tmp.replace(files["subgroups"])
    metrics["files"] = {k: p.name for k, p in files.items()} | {"folds": "folds.parquet", "lineage": "lineage.json"}
    write_text(files["results"], results_markdown(metrics, groups))
    write_json(files["metrics"], metrics)
    return files


# --------------------------------------------------------------------------- words and tables


def _f(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _s(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.3f}"


def _ci(low, high) -> str:
    return "–" if low is None or high is None else f"{low:.3f}–{high:.3f}"


def _fold_line(metrics: dict) -> str:
    spread = metrics["fold_mean_auroc"]
    values = ", ".join(_f(f["mean_auroc"]) for f in metrics["per_fold"])
    sd = f" ± {spread['sd']:.3f}" if spread.get("sd") is not None else ""
    return f"{_f(spread['mean'])}{sd} (mean ± sd over {spread['n']} folds: {values})"


def _cohort_rows(metrics: dict) -> list[tuple[str, dict]]:
    return list((metrics.get("subgroups") or {}).get("cohort", {}).items())


def results_markdown(metrics: dict, groups: pd.DataFrame | None) -> str:
    """``results.md``: pooled figures, per fold, per cohort and subgroup beside the baselines, and in
    words where the model fails or does not beat a baseline."""
    mean, base = metrics["mean"], metrics["baselines"]
    settings = metrics.get("settings", {})
    lines = [f"# Cross-validation: {metrics['folds']} folds by patient", "",
             f"{metrics['n_images']} images of {metrics['n_patients']} patients (the run's train, val and test splits pooled), "
             f"split into {metrics['folds']} folds by patient (seed {settings.get('seed', '?')}). Each fold's model "
             f"({settings.get('backbone', '?')}, {settings.get('epochs', '?')} epoch(s)) chose its checkpoint on an inner validation "
             f"split of {settings.get('val_frac', float('nan')):.0%} of its training patients and scored only the fold it held out. "
             "Intervals: 95% percentile, patient bootstrap "
             f"({metrics['bootstrap']['n_boot']} replicates); model − baseline intervals are paired (same replicates).", "",
             "## Pooled out-of-fold", "",
             f"Mean AUROC **{_f(mean['auroc'])}** [{_ci(mean['ci_low'], mean['ci_high'])}] over {len(mean['findings'])} findings "
             f"with both classes present. Per fold: {_fold_line(metrics)}.", "",
             "| finding | AUROC | 95% CI | positives | negatives |", "|---|---:|---:|---:|---:|"]
    for name, f in metrics["per_finding"].items():
        lines.append(f"| {name} | {_f(f['auroc'])} | {_ci(f['ci_low'], f['ci_high'])} | {f['n_positive']} | {f['n_negative']} |"
                     if f["auroc"] is not None else f"| {name} | undefined | {f['note']} | {f['n_positive']} | {f['n_negative']} |")
    names = list(base)
    lines += ["", "## Per fold", "", "| fold | images | patients | mean AUROC | " + " | ".join(TITLES.get(n, n) for n in names)
              + " | best epoch | inner-val mean AUROC | training minutes |", "|---" * (7 + len(names)) + "|"]
    for f in metrics["per_fold"]:
        seconds = f.get("seconds")
        lines.append(f"| {f['fold']} | {f['n_images']} | {f['n_patients']} | {_f(f['mean_auroc'])} | "
                     + " | ".join(_f(f["baselines"].get(n)) for n in names)
                     + f" | {f.get('best_epoch', '–')} | {_f(f.get('val_mean_auroc'))} | {'–' if seconds is None else f'{seconds / 60:.1f}'} |")
    if names:
        lines += ["", "## Baselines, cross-validated on the same folds", "",
                  "Each baseline is fit on a fold's training images and scores that fold's held-out images; the held-out "
                  "scores are pooled as the model's are.", "",
                  "| baseline | pooled mean AUROC | 95% CI | per fold (mean ± sd) | model − baseline [paired 95% CI] | verdict |",
                  "|---|---:|---:|---:|---:|---|"]
        for n, b in base.items():
            spread = b.get("per_fold", {})
            words = verdict(n, b) or "model better (interval above 0)"
            lines.append(f"| {TITLES.get(n, n)} | {_f(b['mean_auroc'])} | {_ci(b['ci_low'], b['ci_high'])} | "
                         f"{_f(spread.get('mean'))} ± {_f(spread.get('sd'))} | {_s(b['diff'])} [{_s(b['diff_ci_low'])}, {_s(b['diff_ci_high'])}] | {words} |")
    if groups is not None and not groups.empty:
        means = groups[groups["finding"] == MEAN]
        lines += ["", "## By cohort and subgroup (pooled out-of-fold)", "",
                  "| attribute | group | images / patients | mean AUROC | 95% CI | gap to all [paired CI] | "
                  + " | ".join(f"{TITLES.get(n, n)}: AUROC, model − baseline [CI]" for n in names) + " |",
                  "|---" * (6 + len(names)) + "|"]
        for r in means.itertuples():
            cells = [f"{_f(getattr(r, f'baseline_{n}'))}, {_s(getattr(r, f'vs_{n}'))} [{_s(getattr(r, f'vs_{n}_ci_low'))}, "
                     f"{_s(getattr(r, f'vs_{n}_ci_high'))}]" for n in names]
            lines.append(f"| {r.attribute} | {r.group} | {r.n_images} / {r.n_patients} | {_f(r.auroc)} | {_ci(nan_to_none(r.ci_low), nan_to_none(r.ci_high))} | "
                         f"{_s(r.gap)} [{_s(nan_to_none(r.gap_ci_low))}, {_s(nan_to_none(r.gap_ci_high))}] | " + " | ".join(cells) + " |")
    lines += ["", "## Where the model fails", ""]
    lines += [f"- {w}." for w in metrics["warnings"]] or ["- Nowhere these data can show: no subgroup lies wholly below the pooled "
                                                           "figure and the model beats the strongest baseline overall and in every subgroup."]
    spread_lines = metrics.get("spread", {}).get("lines", [])
    if spread_lines:
        lines += ["", "## Findings not spread over every fold", "", *[f"- {s}." for s in spread_lines]]
    return "\n".join(lines) + "\n"


def cv_summary_lines(metrics: dict, out_dir: Path) -> list[str]:
    """The closing lines of ``cxr cv``: pooled OOF mean AUROC [CI], per-fold mean ± sd, per cohort
    beside the baselines, where the model fails, and the output paths."""
    mean = metrics["mean"]
    lines = [f"cv: {metrics['folds']} folds by patient over {metrics['n_images']} images of {metrics['n_patients']} patients",
             f"  pooled out-of-fold mean AUROC {_f(mean['auroc'])} [{_ci(mean['ci_low'], mean['ci_high'])}] over {len(mean['findings'])} findings",
             f"  per fold {_fold_line(metrics)}"]
    for n, b in metrics["baselines"].items():
        lines.append(f"  {TITLES.get(n, n)} baseline (cross-validated): {_f(b['mean_auroc'])} [{_ci(b['ci_low'], b['ci_high'])}]; "
                     f"model − baseline {_s(b['diff'])} [{_s(b['diff_ci_low'])}, {_s(b['diff_ci_high'])}]")
    for value, g in _cohort_rows(metrics):
        versus = ", ".join(f"{n} {_f(v['auroc'])} (model − it {_s(v['diff'])} [{_s(v['diff_ci_low'])}, {_s(v['diff_ci_high'])}])"
                           for n, v in (g.get("baselines") or {}).items())
        lines.append(f"  cohort {value} ({g['n_images']} images): {_f(g['mean_auroc'])} [{_ci(g['ci_low'], g['ci_high'])}]"
                     + (f"; baselines: {versus}" if versus else ""))
    lines += [f"  ! {w}" for w in metrics["warnings"]]
    lines += [f"  not in every fold: {s}" for s in metrics.get("spread", {}).get("lines", [])]
    files = metrics.get("files", {})
    lines.append(f"wrote {out_dir}: " + ", ".join(files.get(k, k) for k in ("oof_predictions", "metrics", "results", "folds")))
    return lines


__all__ = ["cv_baselines", "cv_metrics", "cv_summary_lines", "mean_auroc", "results_markdown", "score_fold",
           "shortfall_lines", "write_cv_outputs"]
