"""Where each stage's files live inside a run directory: the only channel between stages.

``RunDir`` is the run-directory contract in code: every file and folder of the README's table
"The run directory (data contract)" is a path here (``tests/test_rundir.py`` checks that the two
agree), and stages receive a ``RunDir``, never a path string to re-wrap. Nothing else in the
project spells these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# A checkpoint folder of the data contract: the weights (a plain state_dict) and what is needed to
# use them (backbone, findings, image size, normalization).
MODEL_FILE = "model.pt"
INFO_FILE = "model.json"

# Which model a run's evaluate, explain, external and predict use when none is named: the Tune
# search's winner before the plain training run's best epoch.
CHECKPOINT_ORDER = ("tune", "train")
_MAKES = {"tune": "cxr tune", "train": "cxr train"}


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def ensure(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ingest, validate
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def source_json(self) -> Path:
        """Where ingest records the image root and source, so later stages can find the pixels."""
        return self.root / "source.json"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    # split
    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def split_report(self) -> Path:
        return self.root / "split_report.json"

    # preprocess, eda
    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def eda(self) -> Path:
        return self.root / "eda"

    # train, tune
    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def train_best(self) -> Path:
        """The best epoch's checkpoint of ``cxr train`` (model.pt + model.json)."""
        return self.train / "best"

    @property
    def train_history(self) -> Path:
        return self.train / "history.csv"

    @property
    def train_config(self) -> Path:
        """The settings ``cxr train`` ran with (and Ray Train's run path)."""
        return self.train / "config.json"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def tune_best(self) -> Path:
        """The best trial's best epoch of ``cxr tune`` (model.pt + model.json)."""
        return self.tune / "best"

    def best(self, stage: str) -> Path:
        """The published checkpoint of ``stage`` (``"train"`` or ``"tune"``)."""
        if stage not in _MAKES:
            raise ValueError(f"no best checkpoint for stage {stage!r}: one of {', '.join(_MAKES)}")
        return getattr(self, stage) / "best"

    def find_best_checkpoint(self, stages: Iterable[str] = CHECKPOINT_ORDER) -> Path | None:
        """The first of ``stages``' ``best/`` folders (in that order) that holds a checkpoint, or None."""
        for stage in stages:
            if (self.best(stage) / INFO_FILE).is_file():
                return self.best(stage)
        return None

    def best_checkpoint(self, given: Path | str | None = None, stages: Iterable[str] = CHECKPOINT_ORDER) -> Path:
        """The checkpoint a run's later stages use: ``given`` if named, else ``tune/best``, else
        ``train/best`` (only those of ``stages``, in that order); fails naming what makes one."""
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

    # evaluate, explain, report
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_predictions(self) -> Path:
        """The test split's predictions: ids, labels, ``prob_<finding>``."""
        return self.eval / "predictions.parquet"

    @property
    def eval_metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def explain(self) -> Path:
        """Grad-CAM gallery and the pointing game (``cxr explain``)."""
        return self.root / "explain"

    @property
    def explain_pointing(self) -> Path:
        """The pointing game's summary (hit rate against the random-point baseline)."""
        return self.explain / "pointing.json"

    @property
    def report(self) -> Path:
        """The run's one-page HTML report (``cxr report``)."""
        return self.root / "report.html"

    # external validation, cross-validation
    @property
    def externals(self) -> Path:
        """The folder of every external validation set (``external(NAME)`` is one of them)."""
        return self.root / "external"

    def external(self, name: str) -> Path:
        """An external validation set's own run-shaped folder (manifest, quarantine, validation,
        shards, eval), scored by this run's model: ``RunDir(run.external(name))``."""
        return self.externals / name

    @property
    def cv(self) -> Path:
        """Patient-grouped cross-validation (``cxr cv``): out-of-fold predictions, metrics, per-fold runs."""
        return self.root / "cv"
