"""Tune trials and CV folds in MLflow: one run per trial, nested under the search's (or the
cross-validation's) parent run.

Ray's ``MLflowLoggerCallback`` does the bookkeeping (one MLflow run per trial, created when the
trial starts, its results logged per iteration, ended with the trial's status). This subclass
keeps that and changes what is logged: the trial's effective training config and the data
fingerprint instead of Tune's raw param dict, only the training metrics (not Tune's bookkeeping
or the config again), the trial's best checkpoint at its end, and every call through the
``Tracker``'s guard, so a store that goes down stops tracking, not the search.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from ray.air.integrations.mlflow import MLflowLoggerCallback

from trainers.tracking import Tracker
from tuning.results import CHECKPOINT_KEY, METRIC

# Keys of a Tune result that are Tune's bookkeeping, not the training's metrics.
_NOT_METRICS = ("config", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp", "done", CHECKPOINT_KEY)


class TrialRuns(MLflowLoggerCallback):
    """One nested MLflow run per trial. ``params_of(trial_config)`` gives a trial's parameters and
    ``name_of(trial)`` its run name; ``checkpoints``: log each trial's best checkpoint at its end."""

    def __init__(self, tracker: Tracker, parent_run_id: str, tags: dict[str, str], params_of: Callable[[dict], dict],
                 name_of: Callable[[Any], str], checkpoints: bool = True) -> None:
        super().__init__(tracker.uri, experiment_name=tracker.experiment, tags={**tags, "mlflow.parentRunId": parent_run_id})
        self.tracker, self.params_of, self.name_of, self.checkpoints = tracker, params_of, name_of, checkpoints
        self.best: dict[Any, tuple[float, str | None]] = {}

    def setup(self, *args, **kwargs):
        # Ray's setup calls mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI for the whole
        # process: a later stage in it (cxr run, a test) would take this store for the user's choice.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        self._trial_runs = {}
        try:
            self.tracker.call("setting up trial tracking", lambda: super(TrialRuns, self).setup(*args, **kwargs))
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs or not self.tracker.enabled:
            return
        run = self.tracker.call("starting a trial's run",
                                lambda: self.mlflow_util.start_run(tags={**self.tags, "trial_name": str(trial)}, run_name=self.name_of(trial)))
        if run is not None:
            self._trial_runs[trial] = run.info.run_id
            self.tracker.log_params(run.info.run_id, self.params_of(trial.config))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is None:
            return
        metrics = {k: v for k, v in result.items() if k not in _NOT_METRICS}
        self.tracker.log_metrics(run_id, metrics, step=int(result.get("training_iteration", iteration)))
        score, path = result.get(METRIC), result.get(CHECKPOINT_KEY)
        if score is not None and not math.isnan(float(score)) and path and score > self.best.get(trial, (-math.inf, None))[0]:
            self.best[trial] = (float(score), str(path))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is None:
            return
        score, path = self.best.get(trial, (math.nan, None))
        if self.checkpoints and path and Path(path).is_dir():
            self.tracker.log_checkpoint(run_id, Path(path))
        if score == score:
            self.tracker.set_tags(run_id, {"cxr.best_val_mean_auroc": score, "cxr.checkpoint": path})
        self.tracker.end_run(run_id, "FAILED" if failed else "FINISHED")
