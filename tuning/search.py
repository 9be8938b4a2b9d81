"""Run the search: a Tuner over ``tuning.trial.run_trial`` with ASHA early stopping, resumable."""
from __future__ import annotations

import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipelines.errors import UserInputError
from pipelines.rundir import RunDir
from trainers import TrainConfig
from trainers.publish import publish_best
from trainers.tracking import Tracker, clear_record, training_params, training_tags
from tuning.progress import TrialEpochLines, TrialLines, trial_count
from tuning.results import CHECKPOINT_KEY, METRIC, best_checkpoint_path, plot_curves, results_table, write_tables
from tuning.trial import run_trial, trial_config
from tuning.tracking import TrialRuns

TRIAL_DRIVER_CPU = 0.0  # the trial function only waits on its TorchTrainer, whose workers reserve their own CPUs
# Ray refuses an empty resource request, so the trial driver asks for a little memory instead of CPU.
TRIAL_DRIVER_RESOURCES = {"CPU": TRIAL_DRIVER_CPU, "memory": 64 * 2**20}
SEARCH_NAME = "search"


@dataclass
class SearchResult:
    table: pd.DataFrame
    best_dir: Path | None
    csv: Path
    markdown: Path
    curves: Path | None
    trial_epochs: int  # epochs trained over all trials: what early stopping saves


def max_concurrent_trials(cfg: TrainConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once. On a CPU-only cluster one CPU stays free for Ray Data reads
    (docs/architecture.md, known traps: with every CPU reserved the reads never start); GPUs may be fractional."""
    per_trial_cpu = cfg.workers * cfg.cpus_per_worker + TRIAL_DRIVER_CPU
    cpus = resources.get("CPU", 0.0)
    fits = math.floor((cpus - (0 if cfg.use_gpu else 1)) / per_trial_cpu + 1e-9)
    if cfg.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / (cfg.workers * cfg.gpus_per_worker) + 1e-9))
    if fits < 1:
        need = f"{per_trial_cpu:g} CPU" + (f" and {cfg.workers * cfg.gpus_per_worker:g} GPU" if cfg.use_gpu else " plus 1 CPU for data reads")
        raise UserInputError(f"one trial needs {need}; the cluster has {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")
    return fits


def state_api_reachable() -> bool:
    """Whether the cluster serves Ray's state API (the dashboard). Ray Train V2 needs it to free the
    workers of a trial that early stopping killed (ray-project/ray#54305)."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception:  # unreachable for any reason means the same to the caller
        return False
    return True


def open_tuner(path: Path, trainable, param_space: dict, resume: bool, tune_config: tune.TuneConfig,
               callbacks: list | None = None, what: str = "search", remedy: str = "run it without resume first") -> tune.Tuner:
    """The Tuner whose experiment lives at ``path``. With ``resume`` the interrupted one is restored
    (``Tuner.restore``: finished trials are kept as they are, unfinished and failed ones continue);
    otherwise a new one, clearing any earlier experiment there."""
    at_terminal = sys.stdout.isatty()
    if not at_terminal:
        # Tune's newer console output prints its configuration box and result paths even at
        # verbose=0; its older reporter honours verbose=0, so a CI or job log keeps cxr's lines only.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"no {what} to resume at {path}: {remedy}")
        # The experiment's own recorded parameters, not ``param_space``: Tune refuses a space with keys it
        # did not record (a training option added since), and the caller has checked the settings agree.
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    if path.exists():
        shutil.rmtree(path)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        # Tune's live status tables help at a terminal and flood a CI or job log: the result
        # table at the end says it all there.
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), failure_config=tune.FailureConfig(max_failures=0),
                                  verbose=1 if at_terminal else 0, callbacks=callbacks),
    )


def run_search(
    run: RunDir,
    base: TrainConfig,
    space: dict[str, Any],
    num_samples: int = 1,
    asha: bool = True,
    grace_period: int = 1,
    reduction_factor: int = 2,
    resume: bool = False,
    max_concurrent: int | None = None,
    epoch_echo: Callable[[str], None] | None = None,
    tracker: Tracker | None = None,
) -> SearchResult:
    """Search ``space`` (Tune param space over TrainConfig fields) on the connected Ray cluster.
    ``epoch_echo``: also one line per epoch of every trial (``cxr tune --verbose``). ``tracker``:
    one MLflow parent run for the search with a nested run per trial (tuning/tracking.py)."""
    out = run.tune
    storage = (out / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(space) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise UserInputError(f"unknown search parameter(s) {', '.join(unknown)}")
    param_space = {**space, "base": base.to_dict(), "run_dir": str(run.root), "train_storage": str(storage / "train")}
    trainable = tune.with_resources(run_trial, TRIAL_DRIVER_RESOURCES)
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=base.epochs, grace_period=grace_period, reduction_factor=reduction_factor)
        if asha
        else FIFOScheduler()
    )
    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode="max",
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent or max_concurrent_trials(base, ray.cluster_resources()),
    )
    callbacks = [TrialLines(trial_count(space, num_samples), base.epochs)]
    if epoch_echo is not None:
        callbacks.append(TrialEpochLines(base.epochs, lambda trial, index: f"trial {index}", epoch_echo))
    tracker = tracker or Tracker.off()
    clear_record(out)
    parent = tracker.start_run("tune", training_tags(run, "tune"))
    tracker.log_params(parent, {**training_params(run, base), "search.space": repr(space), "search.num_samples": num_samples,
                                "search.asha": asha, "search.grace_period": grace_period})
    if parent:
        callbacks.append(TrialRuns(tracker, parent, training_tags(run, "tune-trial"),
                                   params_of=lambda config: training_params(run, trial_config(config)),
                                   name_of=lambda trial: f"trial {trial.trial_id}"))
    tuner = open_tuner(storage / SEARCH_NAME, trainable, param_space, resume, tune_config, what="search",
                       remedy="run `cxr tune` without --resume first", callbacks=callbacks)
    if asha and not state_api_reachable():
        warnings.warn(
            "the cluster has no Ray dashboard, so trials ASHA stops keep their workers' CPUs/GPUs "
            "reserved (ray-project/ray#54305) and the search may stall; start the head with the "
            "dashboard (`ray start --head --dashboard-host=127.0.0.1`) or pass --no-asha",
            RuntimeWarning,
            stacklevel=2,
        )
    try:
        grid = tuner.fit()
        table = results_table(grid, base.epochs)
        csv, markdown = write_tables(table, out)
        curves = plot_curves(grid, out / "curves.png")
        best_dir = _copy_best(grid, run.tune_best, run)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    _track_search(tracker, parent, run, table, [csv, markdown, curves], best_dir)
    return SearchResult(table, best_dir, csv, markdown, curves, int(table["epochs"].sum()) if len(table) else 0)


def _track_search(tracker: Tracker, parent: str | None, run: RunDir, table: pd.DataFrame, files: list, best_dir: Path | None) -> None:
    """The search's parent run: its result table and curves, the best trial's score and checkpoint
    (registered with ``--register``), and ``tune/tracking.json``."""
    if parent is None:
        return
    tracker.log_files(parent, [f for f in files if f is not None])
    if len(table):
        best = table.iloc[0]
        tracker.log_metrics(parent, {"best_val_mean_auroc": best["best_val_mean_auroc"], "trials": len(table),
                                     "trial_epochs": int(table["epochs"].sum())})
        tracker.set_tags(parent, {"cxr.best_trial": best["trial"]})
    registered = None
    if best_dir is not None:
        tracker.log_checkpoint(parent, best_dir)
        registered = tracker.register(parent)
    tracker.end_run(parent)
    tracker.record(run.tune, parent, **({"registered": registered} if registered else {}))


def _copy_best(grid, best_dir: Path, run: RunDir) -> Path | None:
    """The best trial's best epoch, in the data-contract format (with its OOD statistics), for
    ``cxr evaluate`` and scoring."""
    source = best_checkpoint_path(grid)
    if source is None:
        return None
    return publish_best(Path(source), best_dir, ood_from=run)


__all__ = ["CHECKPOINT_KEY", "SearchResult", "max_concurrent_trials", "open_tuner", "run_search"]
