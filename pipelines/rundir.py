"""Where each stage's files live inside a run directory: the only channel between stages.

``RunDir`` is the run-directory contract in code: every file and folder of the README's table
"The run directory (data contract)" is a path here (``tests/test_rundir.py`` checks that the two
agree), and stages receive a ``RunDir``, never a path string to re-wrap. Nothing else in the
project spells these names (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# A checkpoint folder of the data contract: the weights (a plain state_dict) and what is needed to
# use them (backbone, findings, image size, normalization).
MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
# Beside them when training recorded it: what the training inputs looked like (intensity and
# penultimate-layer feature statistics, thresholds set on validation), for the OOD flag.
OOD_FILE = "ood.npz"

# Which model a run's evaluate, explain and external use when none is named: the Tune search's
# winner before the plain training run's best epoch.
CHECKPOINT_ORDER = ("tune", "train")
_MAKES = {"tune": "cxr tune", "train": "cxr train"}


class At:
    """A path of the contract, relative to the run directory: ``RunDir.manifest = At("manifest.parquet")``
    reads as ``run.manifest == run.root / "manifest.parquet"``."""

    def __init__(self, *parts: str, doc: str | None = None) -> None:
        self.parts = parts
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, run: "RunDir | None", owner: type) -> "Path | At":
        return self if run is None else run.root.joinpath(*self.parts)


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def ensure(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ingest, validate
    manifest = At("manifest.parquet")
    quarantine = At("quarantine.parquet")
    source_json = At("source.json", doc="Where ingest records the image root and source, so later stages can find the pixels.")
    validation = At("validation")

    # split
    splits = At("splits.parquet")
    split_report = At("split_report.json")

    # preprocess, eda
    shards = At("shards")
    stats = At("stats.json")
    eda = At("eda")

    # train, tune
    train = At("train")
    train_best = At("train", "best", doc="The best epoch's checkpoint of ``cxr train`` (model.pt + model.json).")
    train_history = At("train", "history.csv")
    train_config = At("train", "config.json", doc="The settings ``cxr train`` ran with (and Ray Train's run path).")
    tune = At("tune")
    tune_best = At("tune", "best", doc="The best trial's best epoch of ``cxr tune`` (model.pt + model.json).")

    # evaluate, explain, report
    eval = At("eval")
    eval_predictions = At("eval", "predictions.parquet", doc="The test split's predictions: ids, labels, ``prob_<finding>``.")
    eval_metrics = At("eval", "metrics.json")
    explain = At("explain", doc="Grad-CAM gallery and the pointing game (``cxr explain``).")
    explain_pointing = At("explain", "pointing.json", doc="The pointing game's summary (hit rate against the random-point baseline).")
    report = At("report.html", doc="The run's one-page HTML report (``cxr report``).")
    model_card = At("model_card.md", doc="The model card (``cxr card``): what the model is, what it was trained and tested on, how well it does, for whom, and where it fails.")
    model_card_json = At("model_card.json", doc="The model card's facts as JSON, the ones ``model_card.md`` and the report's card section show.")

    # experiment tracking (trainers/tracking.py): the embedded MLflow store, when no tracking server is named
    mlflow_db = At("mlflow.db", doc="The embedded MLflow tracking store (SQLite) of train, tune, cv and evaluate.")
    mlartifacts = At("mlartifacts", doc="The artifacts (best checkpoints, tables, figures) of the runs in ``mlflow.db``.")

    # external validation, cross-validation
    externals = At("external", doc="The folder of every external validation set (``external(NAME)`` is one of them).")
    cv = At("cv", doc="Patient-grouped cross-validation (``cxr cv``): out-of-fold predictions, metrics, per-fold runs.")

    def external(self, name: str) -> Path:
        """An external validation set's own run-shaped folder (manifest, quarantine, validation,
        shards, eval), scored by this run's model: ``RunDir(run.external(name))``."""
        return self.externals / name

    # the checkpoint later stages use
    def best(self, stage: str) -> Path:
        """The published checkpoint of ``stage`` (``"train"`` or ``"tune"``)."""
        if stage not in _MAKES:
            raise ValueError(f"no best checkpoint for stage {stage!r}: one of {', '.join(_MAKES)}")
        return getattr(self, f"{stage}_best")

    def find_best_checkpoint(self, stages: Iterable[str] = CHECKPOINT_ORDER) -> Path | None:
        """The first of ``stages``' ``best/`` folders (in that order) that holds a checkpoint, or None
        (``cxr run`` passes only the stages it ran, then falls back to the verb's own default)."""
        for stage in stages:
            if (self.best(stage) / INFO_FILE).is_file():
                return self.best(stage)
        return None

    def best_checkpoint(self, given: Path | str | None = None, stages: Iterable[str] = CHECKPOINT_ORDER) -> Path:
        """The checkpoint a run's later stages use: ``given`` if named (``--checkpoint``), else
        ``tune/best``, else ``train/best`` (only those of ``stages``, in that order); fails naming
        the commands that make one."""
        if given is not None:
            return Path(given)
        stages = tuple(stages)
        found = self.find_best_checkpoint(stages)
        if found is None:
            commands = " or ".join(f"`{_MAKES[s]} --run {self.root}`" for s in reversed(stages))
            where = " nor ".join(f"{s}/best" for s in stages)
            raise FileNotFoundError(f"no checkpoint in {self.root} ({'neither ' if len(stages) > 1 else ''}{where} holds one): "
                                    f"run {commands} first, or pass --checkpoint PATH")
        return found


def contract_paths() -> list[At]:
    """Every fixed path of the contract, in the order RunDir declares them."""
    return [value for value in vars(RunDir).values() if isinstance(value, At)]
