"""Cross-validation folds as concurrent Ray Tune trials: the fold number is the trial parameter.

Each trial is one Ray Train run (``tuning.trial.fit_trial``, the same loop ``cxr train`` and
``cxr tune`` run) on its fold's training images, choosing its checkpoint on the fold's inner
validation images; the best epoch is published to ``<cv>/folds/fold-K/best`` with its history.
Trials run side by side as far as the cluster allows (``max_concurrent_trials``), a failed fold
does not stop the others, and ``resume`` restores the experiment (``Tuner.restore``): finished folds
are kept, interrupted ones continue from their last checkpoint, failed ones run again.

Which images play which part comes from ``<cv>/folds.parquet`` (``pipelines.folds``), written by
the driver before any trial starts and audited again by every trial that reads it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from ray import tune

from pipelines.folds import read_fold_roles
from pipelines.rundir import RunDir
from trainers import Selection, TrainConfig
from trainers.trainer import write_outputs
from trainers.tracking import Tracker, training_params, training_tags
from tuning.progress import TrialEpochLines
from tuning.tracking import TrialRuns
from tuning.search import TRIAL_DRIVER_RESOURCES, max_concurrent_trials, open_tuner
from tuning.trial import fit_trial, trial_config

FOLDS_FILE = "folds.parquet"
EXPERIMENT = "folds"


def fold_dir(cv_dir: Path, fold: int) -> Path:
    """One fold's own outputs: ``best/`` (model.pt + model.json), ``history.csv``, ``config.json``."""
    return Path(cv_dir) / "folds" / f"fold-{fold}"


def fold_selection(cv_dir: Path, fold: int) -> Selection:
    """The image ids fold ``fold`` trains on and chooses its checkpoint on."""
    roles = read_fold_roles(Path(cv_dir) / FOLDS_FILE)
    mine = roles[roles["fold"] == fold]
    ids = {role: tuple(sorted(mine.loc[mine["role"] == role, "image_id"].astype(str))) for role in ("train", "val")}
    return Selection(train=ids["train"], val=ids["val"])


def run_fold(config: dict) -> None:
    """The trial function: train fold ``config['fold']`` and publish its best epoch."""
    cv_dir, fold = Path(config["cv_dir"]), int(config["fold"])
    result = fit_trial(config, fold_selection(cv_dir, fold), name=f"fold-{fold}")  # one Ray Train run per fold, always
    write_outputs(result, RunDir(config["run_dir"]), trial_config(config), fold_dir(cv_dir, fold))


@dataclass
class FoldRun:
    fold: int
    out_dir: Path  # fold_dir(...)
    error: str | None  # the first line of the trial's error; None when the fold trained


class FoldEvents(tune.Callback):
    """Calls ``on_done(fold, seconds)`` on the driver as each fold's trial finishes (and
    ``on_error(fold, message)`` when one fails), so progress shows while the others still train."""

    def __init__(self, on_done: Callable[[int, float], None] | None, on_error: Callable[[int, str], None] | None):
        self.on_done, self.on_error = on_done, on_error
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()

    def _seconds(self, trial) -> float:
        if trial.trial_id in self.started:
            return time.monotonic() - self.started[trial.trial_id]
        return float((trial.last_result or {}).get("time_total_s") or 0.0)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.on_done is not None:
            self.on_done(int(trial.config["fold"]), self._seconds(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.on_error is not None:
            self.on_error(int(trial.config["fold"]), f"failed after {self._seconds(trial):.0f} s")


def run_folds(run: RunDir, base: TrainConfig, cv_dir: Path, folds: int, resume: bool = False,
              on_done: Callable[[int, float], None] | None = None, on_error: Callable[[int, str], None] | None = None,
              max_concurrent: int | None = None, epoch_echo: Callable[[str], None] | None = None,
              tracker: Tracker | None = None, parent_run: str | None = None) -> list[FoldRun]:
    """Train folds 1..``folds`` of the plan in ``<cv_dir>/folds.parquet`` as Tune trials on the
    connected Ray cluster; returns one ``FoldRun`` per fold (failed ones carry their error).
    ``epoch_echo``: also one line per epoch of every fold (``cxr cv --verbose``). ``tracker`` with
    ``parent_run``: one MLflow run per fold nested under the cross-validation's."""
    cv_dir = Path(cv_dir).resolve()
    storage = cv_dir / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    param_space = {"fold": tune.grid_search(list(range(1, folds + 1))), "base": base.to_dict(), "run_dir": str(run.root),
                   "train_storage": str(storage / "train"), "cv_dir": str(cv_dir)}
    tune_config = tune.TuneConfig(max_concurrent_trials=max_concurrent or max_concurrent_trials(base, ray.cluster_resources()))
    callbacks: list = [FoldEvents(on_done, on_error)]
    if epoch_echo:
        callbacks.append(TrialEpochLines(base.epochs, lambda trial, index: f"fold {trial.config['fold']}", epoch_echo))
    if tracker is not None and parent_run:
        callbacks.append(TrialRuns(tracker, parent_run, training_tags(run, "cv-fold"),
                                   params_of=lambda config: {**training_params(run, trial_config(config)), "fold": config["fold"]},
                                   name_of=lambda trial: f"fold-{trial.config['fold']}"))
    tuner = open_tuner(storage / EXPERIMENT, tune.with_resources(run_fold, TRIAL_DRIVER_RESOURCES), param_space, resume,
                       tune_config, callbacks=callbacks,
                       what="cross-validation",
                       remedy="run it without resume first")
    grid = tuner.fit()
    runs = {}
    for result in grid:
        fold = int(result.config["fold"])
        error = str(result.error).strip().splitlines()[0][:300] if result.error is not None else None
        runs[fold] = FoldRun(fold, fold_dir(cv_dir, fold), error)
    return [runs[k] for k in sorted(runs)]
