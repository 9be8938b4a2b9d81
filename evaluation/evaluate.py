"""``cxr evaluate``: score a checkpoint on the test split and write ``<run>/eval/``.

Thresholds are chosen on validation and only reported on test; intervals resample patients. Files:
``predictions.parquet`` (test) and ``val_predictions.parquet``, ``metrics.json``,
``robustness.csv``, ``subgroups.csv`` and ``figures/*.png``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from evaluation import figures
from evaluation.bootstrap import bootstrap_auroc, mean_replicates, percentile_interval
from evaluation.calibration import expected_calibration_error
from evaluation.inference import load_split, predict_arrays, prediction_frame
from evaluation.metrics import auroc, average_precision, nan_to_none, prevalence
from evaluation.operating_points import choose_threshold, operating_metrics
from evaluation.robustness import robustness_table
from evaluation.baselines import WORDS, Baseline, compare, fit_baselines, split_thumbnails, thumbnails, verdict
from evaluation.subgroups import MEAN, below_overall, not_beating_baselines, subgroup_columns, subgroup_table, subgroups_json
from pipelines.atomic import staged_dir, write_json
from pipelines.errors import UserInputError
from pipelines.formatting import interval, number
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir

VIEW_SHIFT_NOTE = (
    "AUROC of the one model on PA-only and on AP-only test images. A true view-shift experiment "
    "(train on one view, test on the other) needs a model trained on one view only: run `cxr train` "
    "on a run whose manifest holds one view, then evaluate it here."
)


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    predictions: pd.DataFrame  # test split
    robustness: pd.DataFrame | None
    subgroups: pd.DataFrame | None
    figures: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """A short table for the terminal: per-finding AUROC with interval, AP and the operating point."""
        m = self.metrics
        lines = [f"evaluate: {m['n_images']} test images of {m['n_patients']} patients; checkpoint {m['checkpoint']}",
                 f"  {'finding':<19}{'AUROC':>7}  {'95% CI':<13}{'AP':>6}{'prev':>7}{'sens':>7}{'spec':>7}"]
        for name, f in m["per_finding"].items():
            if f["auroc"] is None:
                lines.append(f"  {name:<19}{'undefined':>9}  ({f['note']})")
                continue
            lines.append(f"  {name:<19}{f['auroc']:>7.3f}  {_ci(f):<13}{number(f['ap'], missing='-'):>6}{number(f['prevalence'], missing='-'):>7}"
                         f"{number(f['sensitivity'], missing='-'):>7}{number(f['specificity'], missing='-'):>7}")
        mean = m["mean"]
        lines.append(f"  {'mean':<19}{number(mean['auroc'], 3, missing='-'):>7}  {_ci(mean)} over {len(mean['findings'])} findings")
        lines.append(f"wrote {self.out_dir}")
        return "\n".join(lines)


def _ci(figure: dict) -> str:
    return interval(figure.get("ci_low"), figure.get("ci_high"), 3, missing="-", sep="-")


def _undefined_note(n_pos: int, n_neg: int) -> str | None:
    if n_pos == 0 and n_neg == 0:
        return "no labelled test images"
    if n_pos == 0:
        return "no positive test images"
    if n_neg == 0:
        return "no negative test images"
    return None


def auroc_figures(labels: np.ndarray, probs: np.ndarray, replicates: np.ndarray) -> dict:
    """The threshold-free figures of one finding: AUROC with its bootstrap interval, AP, prevalence."""
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    ci = percentile_interval(replicates)
    return {
        "auroc": nan_to_none(auroc(labels, probs)),
        "ci_low": nan_to_none(ci.low), "ci_high": nan_to_none(ci.high), "n_boot_valid": ci.n_valid,
        "ap": nan_to_none(average_precision(labels, probs)),
        "prevalence": nan_to_none(prevalence(labels)),
        "n_positive": n_pos, "n_negative": n_neg,
        "note": _undefined_note(n_pos, n_neg),
    }


def finding_metrics(labels: np.ndarray, probs: np.ndarray, replicates: np.ndarray, val_labels: np.ndarray,
                    val_probs: np.ndarray, rule: str = "youden") -> dict:
    """Every figure of one finding on test, its threshold chosen on validation."""
    threshold = choose_threshold(val_labels, val_probs, rule)
    return {
        **auroc_figures(labels, probs, replicates),
        **operating_metrics(labels, probs, threshold),
        "ece": nan_to_none(expected_calibration_error(labels, probs)),
    }


def mean_figures(per_finding: dict, replicates: np.ndarray, findings: list[str]) -> dict:
    """The mean over the findings whose AUROC is defined, with its interval from the same replicates."""
    defined = [j for j, name in enumerate(findings) if per_finding[name]["auroc"] is not None]
    mean_ci = percentile_interval(mean_replicates(replicates, defined))
    return {
        "auroc": nan_to_none(np.mean([per_finding[findings[j]]["auroc"] for j in defined]) if defined else math.nan),
        "ci_low": nan_to_none(mean_ci.low), "ci_high": nan_to_none(mean_ci.high), "n_boot_valid": mean_ci.n_valid,
        "ap": nan_to_none(np.mean([per_finding[findings[j]]["ap"] for j in defined]) if defined else math.nan),
        "findings": [findings[j] for j in defined],
    }


def with_meta(frame: pd.DataFrame, run: RunDir) -> pd.DataFrame:
    """Add the manifest's other columns (sex, age, view, cohort, ...: for subgroups and the
    metadata baseline), where the run has a manifest."""
    if not run.manifest.exists():
        return frame
    manifest = pd.read_parquet(run.manifest)
    keep = [c for c in manifest.columns if c not in frame.columns and c not in (*FINDINGS, "path")]
    manifest = manifest[["image_id", *keep]].assign(image_id=manifest["image_id"].astype(str))
    return frame.merge(manifest, on="image_id", how="left")


def _baselines(run: RunDir, test: pd.DataFrame, test_images: np.ndarray, findings: list[str], size: int, seed: int) -> list[Baseline]:
    """Both baselines, fit on the run's train split and scored on ``test``."""
    train, train_thumbs = split_thumbnails(run.shards, "train", size)
    train = with_meta(train, run)
    return fit_baselines(train, train[findings].to_numpy(np.int8), train_thumbs, test, thumbnails(test_images), seed)


def failure_lines(mean: dict, comparisons: dict[str, dict], groups: pd.DataFrame | None) -> list[str]:
    """Where the model fails, in words: subgroups well below the overall figure, and the strongest
    baseline when the model is not shown to beat it (overall; or, when it beats it overall, in
    each subgroup where it does not)."""
    lines = below_overall(groups, mean.get("auroc")) if groups is not None else []
    if comparisons:
        strongest = max(comparisons, key=lambda b: comparisons[b]["mean_auroc"] if comparisons[b]["mean_auroc"] is not None else -1)
        overall = verdict(strongest, comparisons[strongest])
        if overall:  # then it is no better inside the subgroups either: one line says it
            lines.append(f"Overall, the model is {overall}")
        elif groups is not None and not groups.empty:  # better overall: name any subgroup where it is not
            lines += not_beating_baselines(groups, [strongest], WORDS)
    return lines


def _view_shift(subgroups: pd.DataFrame | None) -> dict | None:
    if subgroups is None or subgroups.empty:
        return None
    rows = subgroups[(subgroups["attribute"] == "view") & (subgroups["finding"] == MEAN)]
    if rows.empty:
        return None
    views = {r.group: {"mean_auroc": nan_to_none(r.auroc), "ci_low": nan_to_none(r.ci_low),
                       "ci_high": nan_to_none(r.ci_high), "n_images": int(r.n_images)} for r in rows.itertuples()}
    return {**views, "note": VIEW_SHIFT_NOTE}


def evaluate_run(run: RunDir, checkpoint: Path | None = None, n_boot: int = 1000, seed: int = 0,
                 robustness: bool = True, threshold_rule: str = "youden", subgroups: list[str] | None = None,
                 data: RunDir | None = None, progress: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate ``checkpoint`` (default: ``<run>/tune/best``, else ``<run>/train/best``) on the
    run's test split beside both baselines, broken down by ``subgroups`` (default: every one of
    sex, age band, view and cohort present); write ``<run>/eval/``.

    ``data`` scores another collection instead (external validation): its test shards and manifest
    are read and its ``eval/`` written, while thresholds are still chosen on the run's validation
    split and the baselines fit on the run's train split, so both sets are judged by one rule.
    ``progress`` gets one line per phase as it ends (and per robustness level): at NIH's test-split
    size the whole takes tens of minutes."""
    from trainers.checkpoint import load_checkpoint  # torch only when evaluating

    data = run if data is None else data
    checkpoint = run.best_checkpoint(checkpoint)
    model, info = load_checkpoint(checkpoint)
    findings, size = list(info["findings"]), int(info["image_size"])
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise UserInputError(f"checkpoint {checkpoint} predicts {unknown}, which the shards do not label")
    started = time.perf_counter()
    say = progress or (lambda line: None)
    test, val = load_split(data, "test", size), load_split(run, "val", size)
    test_probs = predict_arrays(model, info, test.images)
    val_probs = predict_arrays(model, info, val.images)
    say(f"scored {len(test.frame):,} test and {len(val.frame):,} validation images ({time.perf_counter() - started:.0f} s)")
    frame = with_meta(prediction_frame(test, test_probs, findings), data)
    labels, val_labels = test.labels(findings), val.labels(findings)
    patients = frame["patient_id"].to_numpy()
    columns = subgroup_columns(frame, subgroups)
    baselines = _baselines(run, frame, test.images, findings, size, seed)
    comparisons = {b.name: compare(labels, test_probs, patients, findings, b, n_boot, seed) for b in baselines}
    say(f"baselines fit and compared, {n_boot} patient bootstrap replicates ({time.perf_counter() - started:.0f} s)")

    replicates = bootstrap_auroc(labels, test_probs, patients, n_boot, seed)
    per_finding = {name: finding_metrics(labels[:, j], test_probs[:, j], replicates[:, j], val_labels[:, j],
                                         val_probs[:, j], threshold_rule) for j, name in enumerate(findings)}
    mean = mean_figures(per_finding, replicates, findings)
    say(f"per-finding metrics and intervals ({time.perf_counter() - started:.0f} s)")

    # Built in a staging folder and swapped in whole: an interrupted evaluation leaves the last
    # complete eval/ (which explain and report read), never a mix of two.
    with staged_dir(data.eval) as out:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / data.eval_predictions.name, index=False)
        with_meta(prediction_frame(val, val_probs, findings), run).to_parquet(out / "val_predictions.parquet", index=False)
        shown = mean["findings"]
        made: dict[str, Path] = {}
        if shown:
            made["roc"] = figures.roc_grid(frame, shown, per_finding, out / "figures" / "roc.png")
            made["pr"] = figures.pr_grid(frame, shown, per_finding, out / "figures" / "pr.png")
            made["calibration"] = figures.reliability_grid(frame, shown, per_finding, out / "figures" / "calibration.png")

        robust = None
        if robustness and shown:
            robust = robustness_table(lambda images: predict_arrays(model, info, images), test.images, labels, findings,
                                      seed=seed, clean_probs=test_probs, progress=progress)
            robust.to_csv(out / "robustness.csv", index=False)
            made["robustness"] = figures.robustness_plot(robust, out / "figures" / "robustness.png")

        groups = None
        if columns:
            groups = subgroup_table(frame, findings, columns, {b.name: b.probs for b in baselines}, n_boot=n_boot, seed=seed)
            groups.to_csv(out / "subgroups.csv", index=False)
            say(f"subgroups: {', '.join(columns)} ({time.perf_counter() - started:.0f} s)")
            if not groups.empty and shown:
                made["subgroups"] = figures.subgroup_plot(groups, mean, out / "figures" / "subgroups.png")

        metrics = {
            "checkpoint": str(Path(checkpoint).resolve()),
            "backbone": info.get("backbone"),
            "image_size": size,
            "split": "test",
            "n_images": int(len(frame)),
            "n_patients": int(frame["patient_id"].nunique()),
            "val_images": int(len(val.frame)),
            "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile"},
            "operating_point": {"rule": threshold_rule, "chosen_on": "val"},
            "per_finding": per_finding,
            "mean": mean,
            "mean_auroc": mean["auroc"],
            "view_shift": _view_shift(groups),
            "baselines": comparisons,
            "subgroups": subgroups_json(groups, [b.name for b in baselines]) if groups is not None else {},
            "warnings": failure_lines(mean, comparisons, groups),
            "files": {"predictions": data.eval_predictions.name, "val_predictions": "val_predictions.parquet",
                      **({"robustness": "robustness.csv"} if robust is not None else {}),
                      **({"subgroups": "subgroups.csv"} if groups is not None else {})},
            "figures": {k: str(p.relative_to(out)) for k, p in made.items()},
        }
        write_json(out / data.eval_metrics.name, metrics)
    made = {k: data.eval / p.relative_to(out) for k, p in made.items()}
    return EvalResult(data.eval, metrics, frame, robust, groups, made)
