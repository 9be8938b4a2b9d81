"""A search you can watch: one line per trial as it finishes (Tune calls its callbacks in the driver),
and with ``--verbose`` one line per epoch of every trial or fold as Tune receives it."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

from ray import tune

from pipelines.formatting import duration

from tuning.results import METRIC
from trainers.config import STRATEGY_AXES
from trainers.progress import epoch_line


def _echo(line: str) -> None:
    print(line, flush=True)


def trial_line(index: int, total: int, config: dict[str, Any], best: float, epochs: int, max_epochs: int, seconds: float,
               error: str | None = None) -> str:
    """``trial 3/12  sampling=over  loss=bce  freeze=none  lr=3.2e-04  best val mean AUROC 0.712  4/4 epochs  1m20s``."""
    shown = "  ".join(f"{k}={config[k]:.1e}" if isinstance(config.get(k), float) else f"{k}={config[k]}" for k in STRATEGY_AXES if k in config)
    if error:
        outcome = f"failed: {error}"
    else:
        score = f"best val mean AUROC {best:.3f}" if best == best else "no defined val AUROC"
        stopped = " (stopped early)" if epochs < max_epochs else ""
        outcome = f"{score}  {epochs}/{max_epochs} epochs{stopped}"
    return f"trial {index}/{total}  {shown}  {outcome}  {duration(seconds)}"


def trial_count(space: dict[str, Any], num_samples: int) -> int:
    """Trials a search will run: every grid point, ``num_samples`` times (Tune creates them lazily)."""
    return num_samples * math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v)


class TrialLines(tune.Callback):
    """Prints :func:`trial_line` for each trial that completes or fails."""

    def __init__(self, total: int, max_epochs: int) -> None:
        self.total, self.max_epochs, self.finished, self.started = total, max_epochs, 0, {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())

    def _line(self, trials: list, trial, error: str | None = None) -> None:
        self.finished += 1
        result = trial.last_result or {}
        history = trial.metric_analysis.get(METRIC, {}) if hasattr(trial, "metric_analysis") else {}
        best = history.get("max", math.nan)
        seconds = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        _echo(trial_line(self.finished, max(self.total, len(trials)), trial.config, best if best is not None else math.nan,
                         int(result.get("training_iteration", 0)), self.max_epochs, seconds, error))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(trials, trial, error=str(getattr(trial, "error_msg", None) or "see tune/results.csv").splitlines()[0][:120])


class TrialEpochLines(tune.Callback):
    """``--verbose``: each epoch a trial reports, as ``trial 3  epoch 2/4  train loss ...`` (or
    ``fold 2  epoch ...``), the same line ``cxr train`` prints. ``label(trial, index)`` names the
    trial; ``index`` counts trials in the order they started."""

    def __init__(self, epochs: int, label: Callable[[Any, int], str], echo: Callable[[str], None] = _echo) -> None:
        self.epochs, self.label, self.echo = epochs, label, echo
        self.state: dict[str, dict[str, Any]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.state.setdefault(trial.trial_id, {"index": len(self.state) + 1, "started": time.monotonic(), "best": -math.inf, "first": None})

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if "epoch" not in result:
            return
        state = self.state.setdefault(trial.trial_id, {"index": len(self.state) + 1, "started": time.monotonic(), "best": -math.inf, "first": None})
        epoch = int(result["epoch"])
        if state["first"] is None:
            state["first"] = int(result.get("start_epoch", epoch - 1))
        line = epoch_line(result, self.epochs, state["best"], time.monotonic() - state["started"], epoch - state["first"])
        auroc = result.get("val_mean_auroc", math.nan)
        if auroc == auroc:
            state["best"] = max(state["best"], auroc)
        self.echo(f"{self.label(trial, state['index'])}  {line}")
