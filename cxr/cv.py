"""``cxr cv``: patient-grouped k-fold cross-validation of the training recipe, into ``<run>/cv/``.

The composition of three library parts: ``pipelines.folds`` (folds by patient, inner validation
splits, the leakage audit), ``tuning.cv`` (each fold one Ray Train run, the folds concurrent Ray
Tune trials, resumable) and ``evaluation.cv`` (held-out scoring, pooled out-of-fold figures beside
cross-validated baselines, by cohort and subgroup). Like every stage it works on whatever Ray
cluster the caller connected to; it never starts Ray.

``<run>/cv/``: ``folds.parquet`` (fold, image_id, patient_id, role: train / val / held_out),
``settings.json``, ``lineage.json`` (the shards it was cut from), ``folds/fold-K/`` (best checkpoint,
history, held-out ``predictions.parquet``), ``ray/`` (the Tune experiment a resume restores), and at
the end ``oof_predictions.parquet``, ``subgroups.csv``, ``results.md`` and ``metrics.json``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from pipelines.atomic import write_json
from pipelines.errors import CxrError, UserInputError
from pipelines.folds import FOLD_COLUMNS, FoldPlan, audit_folds, check_folds, plan_folds, read_fold_roles
from pipelines.formatting import duration
from pipelines.labels import FINDINGS
from pipelines.lineage import StaleOutputError, current_shards, write_model_lineage, write_parquet
from pipelines.rundir import RunDir
from pipelines.shards import every_row
from pipelines.split import LeakageError
from trainers.config import TrainConfig
from trainers.tracking import Tracker, clear_record, headline_metrics, training_params, training_tags

SETTINGS_FILE = "settings.json"


class CVIncomplete(CxrError, RuntimeError):
    """Some folds failed: the finished ones are kept, and a resume retries the rest."""


@dataclass
class CVResult:
    out_dir: Path  # <run>/cv
    metrics: dict
    oof: pd.DataFrame  # every image once, with the fold that held it out
    plan: FoldPlan
    resumed: list[int] = field(default_factory=list)  # folds already finished when a resume began
    trained: list[int] = field(default_factory=list)  # folds trained (or continued) by this call


def _check_inputs(run: RunDir, folds: int) -> dict:
    """Bad input stops here, before anything is written or trained; returns the shards' stats."""
    check_folds(folds)
    if not run.stats.exists() or not run.shards.is_dir():
        raise UserInputError(f"no preprocessed shards in {run.root}: cross-validation trains on them; run "
                             f"`cxr preprocess --run {run.root}` first (after `cxr ingest` and `cxr split`)")
    return current_shards(run)  # refuses shards cut from older splits or manifests


def _settings(base: TrainConfig, folds: int, seed: int, val_frac: float, stats: dict) -> dict:
    return {"folds": folds, "seed": seed, "val_frac": val_frac, "shards": stats.get("shards"), "train_config": base.to_dict()}


def _start(run: RunDir, plan: FoldPlan, settings: dict, stats: dict) -> None:
    """A new cross-validation: clear an earlier one, write the plan, the settings and the lineage."""
    if run.cv.exists():
        shutil.rmtree(run.cv)
    run.cv.mkdir(parents=True)
    write_parquet(plan.roles[FOLD_COLUMNS], run.cv / "folds.parquet", made_from={"shards": str(stats.get("shards"))})
    write_json(run.cv / SETTINGS_FILE, settings)
    write_model_lineage(run.cv, stats)


def _check_resume(run: RunDir, plan: FoldPlan, settings: dict) -> None:
    """A resume continues the same cross-validation: same settings, same shards, same folds."""
    path = run.cv / SETTINGS_FILE
    if not path.exists() or not (run.cv / "folds.parquet").exists():
        raise UserInputError(f"no cross-validation to resume at {run.cv}: run it without resume first")
    before = json.loads(path.read_text())
    with contextlib.suppress(UserInputError, TypeError, ValueError):  # an option added since takes its default
        before["train_config"] = TrainConfig.from_dict(before["train_config"]).to_dict()
    changed = sorted(k for k in settings if before.get(k) != settings[k])
    if "shards" in changed:
        raise StaleOutputError(f"the cross-validation at {run.cv} was trained on other shards than {run.shards} hold now "
                               f"(preprocess ran again since): run it without resume to start over")
    if changed:
        raise UserInputError(f"the cross-validation at {run.cv} was started with other settings ({', '.join(changed)} differ): "
                             "resume it with the same ones, or run it without resume to start over")
    stored = read_fold_roles(run.cv / "folds.parquet")
    key = ["fold", "image_id", "role"]
    if not stored[key].astype(str).sort_values(key).reset_index(drop=True).equals(
            plan.roles[key].astype(str).sort_values(key).reset_index(drop=True)):
        raise UserInputError(f"{run.cv / 'folds.parquet'} no longer matches the folds these shards and settings give: "
                             "run it without resume to start over")


def _check_oof(oof: pd.DataFrame, plan: FoldPlan) -> None:
    """Every image scored exactly once, by the fold that held it out."""
    held = plan.assignment.assign(image_id=lambda t: t["image_id"].astype(str))
    twice = oof["image_id"][oof["image_id"].duplicated()]
    if len(twice):
        raise LeakageError(f"{twice.nunique()} image(s) were scored by more than one fold (e.g. {list(twice[:5])})")
    merged = held.merge(oof[["image_id", "fold"]], on="image_id", how="outer", suffixes=("", "_scored"), indicator=True)
    wrong = merged[(merged["_merge"] != "both") | (merged["fold"] != merged["fold_scored"])]
    if len(wrong):
        raise LeakageError(f"{len(wrong)} image(s) were not scored by the fold that held them out (e.g. {list(wrong['image_id'][:5])})")


def run_cv(run: RunDir, base: TrainConfig, folds: int, *, seed: int = 0, val_frac: float = 0.15, resume: bool = False,
           n_boot: int = 1000, subgroups: list[str] | None = None, progress: Callable[[str], None] = print,
           max_concurrent: int | None = None, verbose: bool = False, tracker: Tracker | None = None) -> CVResult:
    """Patient-grouped ``folds``-fold cross-validation of ``base`` over every image of the run's
    shards, on the connected Ray cluster; writes ``<run>/cv/``. ``resume`` continues an interrupted
    one (finished folds are not trained again). ``progress`` gets one line per finished fold (and,
    ``verbose``, one per epoch of every fold). ``tracker``: an MLflow parent run for the
    cross-validation (settings, the pooled out-of-fold figures, ``results.md``) with one nested run per fold."""
    from evaluation.cv import mean_auroc, score_fold
    from tuning.cv import fold_dir, run_folds

    stats = _check_inputs(run, folds)
    table = every_row(run.shards, ["image_id", "patient_id", *FINDINGS])
    plan = plan_folds(table, folds, seed, val_frac)  # more folds than patients: a UserInputError here
    settings = _settings(base, folds, seed, val_frac, stats)
    if resume:
        _check_resume(run, plan, settings)
    else:
        _start(run, plan, settings, stats)
    audit_folds(read_fold_roles(run.cv / "folds.parquet"), table)

    def scored(fold: int) -> bool:
        return (fold_dir(run.cv, fold) / "predictions.parquet").exists()

    def score(fold: int) -> pd.DataFrame:
        return score_fold(run, fold_dir(run.cv, fold), fold, plan.ids(fold, "held_out"))

    finished = [k for k in range(1, folds + 1) if scored(k)] if resume else []
    if resume:
        todo = [k for k in range(1, folds + 1) if k not in finished]
        progress(f"cv: resuming {run.cv}: fold(s) {', '.join(map(str, finished)) or 'none'} already finished; "
                 f"{'training fold(s) ' + ', '.join(map(str, todo)) if todo else 'nothing left to train'}")
    started = time.monotonic()

    def on_done(fold: int, seconds: float) -> None:
        frame = score(fold)
        value, _ = mean_auroc(frame)
        progress(f"cv: fold {fold}/{folds} done in {duration(seconds)}: held-out mean AUROC {value:.3f} on {len(frame)} images "
                 f"of {frame['patient_id'].nunique()} patients ({duration(time.monotonic() - started)} since start)")

    def on_error(fold: int, message: str) -> None:
        progress(f"cv: fold {fold}/{folds} {message}; the other folds go on")

    tracker = tracker or Tracker.off()
    clear_record(run.cv)
    parent = tracker.start_run(f"cv {folds} folds", training_tags(run, "cv"))
    tracker.log_params(parent, {**training_params(run, base), "cv.folds": folds, "cv.seed": seed, "cv.val_frac": val_frac, "cv.resumed": resume})
    try:
        runs = run_folds(run, base, run.cv, folds, resume=resume, on_done=on_done, on_error=on_error, max_concurrent=max_concurrent,
                         epoch_echo=(lambda line: progress(f"cv: {line}")) if verbose else None, tracker=tracker, parent_run=parent)
        result = _pool(run, base, folds, seed, val_frac, n_boot, subgroups, stats, plan, runs, scored, score, finished)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.log_metrics(parent, headline_metrics(result.metrics))
    tracker.log_files(parent, [run.cv / "results.md", run.cv / "metrics.json"])
    tracker.end_run(parent)
    tracker.record(run.cv, parent)
    return result


def _pool(run: RunDir, base: TrainConfig, folds: int, seed: int, val_frac: float, n_boot: int, subgroups: list[str] | None,
          stats: dict, plan: FoldPlan, runs: list, scored: Callable[[int], bool], score: Callable[[int], pd.DataFrame],
          finished: list[int]) -> CVResult:
    """The folds' held-out predictions pooled and scored: out-of-fold metrics beside the baselines."""
    from evaluation.cv import cv_baselines, cv_metrics, shortfall_lines, write_cv_outputs
    from tuning.cv import fold_dir

    failed = [r for r in runs if r.error is not None]
    unfinished = [r.fold for r in runs if r.error is None and not (r.out_dir / "best" / "model.json").is_file()]
    if failed or unfinished:  # a failed trial, or an interrupted fit (Ctrl-C): keep what finished
        what = [f"fold {r.fold} failed: {r.error}" for r in failed] + [f"fold {k} did not finish" for k in unfinished]
        kept = folds - len(failed) - len(unfinished)
        raise CVIncomplete(f"{len(what)} of {folds} folds are not done ({'; '.join(what)}); the {kept} finished fold(s) are kept "
                           f"in {run.cv / 'folds'}: resume to continue (finished folds are not trained again)")
    frames = [pd.read_parquet(fold_dir(run.cv, k) / "predictions.parquet") if scored(k) else score(k) for k in range(1, folds + 1)]
    oof = pd.concat(frames, ignore_index=True)
    _check_oof(oof, plan)
    from evaluation.evaluate import with_meta

    oof = with_meta(oof, run)
    info = _fold_info(run, folds, fold_dir, plan)
    image_size = int(stats["image_size"])
    baselines = cv_baselines(run, oof, plan.roles, image_size, seed)
    metrics, groups = cv_metrics(oof, baselines, info, n_boot=n_boot, seed=seed, subgroups=subgroups)
    metrics["settings"] = {"folds": folds, "seed": seed, "val_frac": val_frac, "backbone": base.backbone, "epochs": base.epochs,
                           "image_size": image_size, "train_config": base.to_dict()}
    metrics["spread"] = {"shortfalls": plan.shortfalls, "not_in_every_fold": [s["finding"] for s in plan.shortfalls],
                         "lines": shortfall_lines(plan.shortfalls)}
    metrics["lineage"] = {"shards": stats.get("shards"), "record": str(run.cv / "lineage.json")}
    write_cv_outputs(run, oof, metrics, groups)
    return CVResult(run.cv, metrics, oof, plan, resumed=finished, trained=[k for k in range(1, folds + 1) if k not in finished])


def _fold_info(run: RunDir, folds: int, fold_dir, plan: FoldPlan) -> dict[int, dict]:
    """What each fold's run reported: sizes of its parts, its best epoch and inner-validation AUROC."""
    info = {}
    for k in range(1, folds + 1):
        out = fold_dir(run.cv, k)
        model = json.loads((out / "best" / "model.json").read_text())
        history = pd.read_csv(out / "history.csv") if (out / "history.csv").exists() else pd.DataFrame()
        info[k] = {"n_train": len(plan.ids(k, "train")), "n_val": len(plan.ids(k, "val")), "best_epoch": model.get("epoch"),
                   "val_mean_auroc": (model.get("metrics") or {}).get("val_mean_auroc"),
                   "seconds": float(history["train_seconds"].sum()) if "train_seconds" in history else None,
                   "checkpoint": str(out / "best")}
    return info


def can_resume(run: RunDir) -> bool:
    """Whether ``<run>/cv`` holds an interrupted cross-validation that ``resume`` can continue."""
    from ray import tune

    from tuning.cv import EXPERIMENT

    return tune.Tuner.can_restore(str(run.cv / "ray" / EXPERIMENT))


def cv_summary(result: CVResult) -> str:
    """The closing summary of ``cxr cv``: pooled OOF mean AUROC [CI], per-fold mean ± sd, per cohort
    beside the baselines, where the model fails, output paths."""
    from evaluation.cv import cv_summary_lines

    lines = cv_summary_lines(result.metrics, result.out_dir)
    if result.resumed:
        lines.insert(1, f"  resumed: fold(s) {', '.join(map(str, result.resumed))} were already finished and not trained again")
    return "\n".join(lines)


__all__ = ["CVIncomplete", "CVResult", "cv_summary", "run_cv"]
