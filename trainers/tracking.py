"""Experiment tracking in MLflow: one MLflow run per ``cxr train``, Tune trial, CV fold and
``cxr evaluate``, so runs can be compared across run directories, people and clusters.

Every call goes through the driver (never a Ray worker): the default store is embedded and local,
``sqlite:///<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts``, and a worker on another node
cannot see that file. (That is why Ray's ``setup_mlflow`` in the training loop is not used: the
driver already receives every epoch's metrics, trainers/progress.py.) A tracking server
(``--tracking-uri`` / ``MLFLOW_TRACKING_URI``) works the same way.

Tracking never fails or slows a training: the store is probed once with a short timeout, every
call is guarded, and the first failure warns once and turns tracking off for the rest of the stage.
What was logged where is recorded in ``tracking.json`` beside the stage's outputs, so a later stage
(evaluate tagging a registered version, report adding its page) finds the run again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipelines.atomic import write_json
from pipelines.rundir import RunDir

RECORD = "tracking.json"
CHECKPOINT_ARTIFACT = "best_checkpoint"
CHECKPOINT_FILES = ("model.pt", "model.json", "ood.npz")  # the data contract's checkpoint; not the optimizer state
# MLflow's limits: a param value of at most 6000 characters, at most 100 params per batch call.
MAX_PARAM_CHARS = 6000
PARAMS_PER_CALL = 100
# A tracking server that is down must cost seconds, not MLflow's default minutes of retries.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _client_defaults() -> None:
    """Short HTTP retries (unless the user set them) and MLflow's INFO lines (table creation,
    migrations) kept out of the terminal."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def local_store(run_root: Path) -> tuple[str, str]:
    """The embedded default: ``(tracking URI, artifact location)`` inside the run directory."""
    run = RunDir(Path(run_root).resolve())
    return f"sqlite:///{run.mlflow_db}", run.mlartifacts.as_uri()


def is_local_store(uri: str, run_root: Path) -> bool:
    """Whether ``uri`` is the run's embedded store (the one the UI command opens)."""
    return uri == local_store(run_root)[0]


def ui_command(run_root: Path) -> str:
    """The one command that opens the MLflow UI on a run's local store."""
    return f"mlflow ui --backend-store-uri {local_store(run_root)[0]} --port 5000"


def code_version() -> str:
    """``cxr <version>``, plus the git commit (``-dirty`` with uncommitted changes) in a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("cxr")
    except PackageNotFoundError:  # run from a source tree that was never installed
        __version__ = "unknown"
    here = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return f"cxr {__version__}"
    if commit.returncode != 0:
        return f"cxr {__version__}"
    return f"cxr {__version__} ({commit.stdout.strip()}{'-dirty' if dirty.stdout.strip() else ''})"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow keys are flat."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def finite_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries (an undefined AUROC is NaN: left out, not logged as a number)."""
    out = {}
    for key, value in flatten(values).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


@dataclass
class Tracker:
    """MLflow for one stage: a client on ``uri`` and the experiment's id, or off (``enabled`` False).

    Build it with ``Tracker.open``; ``Tracker.off()`` is the disabled one (``--no-tracking``)."""

    uri: str | None = None
    experiment: str = "cxr"
    register_as: str | None = None  # --register NAME: the registered model the best checkpoint becomes a version of
    experiment_id: str | None = None
    enabled: bool = False
    warnings_given: list[str] = field(default_factory=list)

    @classmethod
    def off(cls) -> "Tracker":
        return cls()

    @classmethod
    def open(cls, run_root: Path, uri: str | None = None, experiment: str = "cxr", register: str | None = None) -> "Tracker":
        """Connect to ``uri`` (else ``MLFLOW_TRACKING_URI``, else the run's local store) and make sure the
        experiment exists. An unreachable store warns once and gives a disabled tracker."""
        _client_defaults()
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        artifact_location = None
        if not uri:
            uri, artifact_location = local_store(run_root)
        tracker = cls(uri=uri, experiment=experiment, register_as=register, enabled=True)
        tracker.experiment_id = tracker.call(f"opening experiment {experiment!r}", lambda: tracker._experiment(artifact_location))
        return tracker

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _experiment(self, artifact_location: str | None) -> str:
        client = self._client()
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(self.experiment, artifact_location=artifact_location)

    def call(self, doing: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` when tracking is on; a failure warns once, turns tracking off and returns None."""
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as err:  # any failure of the store is the same to a training: go on without it
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            message = f"MLflow tracking is off for the rest of this stage: {doing} at {self.uri} failed ({first[:300]})"
            self.enabled = False
            self.warnings_given.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return None

    def start_run(self, name: str, tags: dict[str, str] | None = None, parent: str | None = None) -> str | None:
        """A new run's id (nested under ``parent`` when given), or None when tracking is off."""
        tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.call(f"starting run {name!r}", lambda: self._client().create_run(self.experiment_id, run_name=name, tags=tags))
        return run.info.run_id if run is not None else None

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if run_id is None:
            return
        flat = [Param(k, ("" if v is None else str(v))[:MAX_PARAM_CHARS]) for k, v in sorted(flatten(params).items())]
        for start in range(0, len(flat), PARAMS_PER_CALL):
            self.call("logging parameters", lambda chunk=flat[start:start + PARAMS_PER_CALL]: self._client().log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str | None, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        if run_id is None:
            return
        now = get_current_time_millis()
        values = [Metric(k, v, now, step or 0) for k, v in sorted(finite_metrics(metrics).items())]
        for start in range(0, len(values), 1000):  # MLflow takes at most 1000 metrics per batch call
            self.call("logging metrics", lambda chunk=values[start:start + 1000]: self._client().log_batch(run_id, metrics=chunk))

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if run_id is None:
            return
        self.call("setting tags", lambda: self._client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_files(self, run_id: str | None, files: Iterable[Path], artifact_path: str | None = None) -> None:
        """Log each existing file of ``files`` under ``artifact_path``."""
        if run_id is None:
            return
        for path in files:
            if Path(path).is_file():
                self.call(f"logging {Path(path).name}", lambda p=path: self._client().log_artifact(run_id, str(p), artifact_path))

    def log_folder(self, run_id: str | None, folder: Path, artifact_path: str) -> None:
        if run_id is not None and Path(folder).is_dir():
            self.call(f"logging {folder}", lambda: self._client().log_artifacts(run_id, str(folder), artifact_path))

    def log_checkpoint(self, run_id: str | None, checkpoint: Path) -> None:
        """The checkpoint of the data contract (model.pt, model.json, ood.npz) as ``best_checkpoint/``."""
        self.log_files(run_id, (Path(checkpoint) / name for name in CHECKPOINT_FILES), CHECKPOINT_ARTIFACT)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self.call("ending the run", lambda: self._client().set_terminated(run_id, status))

    def register(self, run_id: str | None) -> dict[str, str] | None:
        """The run's ``best_checkpoint/`` as a new version of ``register_as``: ``{"name", "version"}``."""
        if run_id is None or not self.register_as:
            return None

        def create() -> dict[str, str]:
            from mlflow.exceptions import MlflowException

            client = self._client()
            try:
                client.get_registered_model(self.register_as)
            except MlflowException:
                client.create_registered_model(self.register_as, description="cxr chest X-ray classifier (cxr train / cxr tune)")
            source = f"{client.get_run(run_id).info.artifact_uri}/{CHECKPOINT_ARTIFACT}"
            version = client.create_model_version(self.register_as, source=source, run_id=run_id)
            return {"name": self.register_as, "version": str(version.version), "source": source}

        return self.call(f"registering the checkpoint as {self.register_as!r}", create)

    def record(self, folder: Path, run_id: str | None, **extra: Any) -> None:
        """``<folder>/tracking.json``: where this stage's run lives, for the stages after it."""
        if run_id is None:
            return
        write_json(Path(folder) / RECORD, {"tracking_uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                                           "run_id": run_id, **extra})


def clear_record(folder: Path) -> None:
    """Forget an earlier run's ``tracking.json`` as a stage starts again: a later stage must not link
    to (or tag the registered version of) a model this stage no longer holds."""
    (Path(folder) / RECORD).unlink(missing_ok=True)


def read_record(folder: Path) -> dict | None:
    """The ``tracking.json`` a stage wrote in ``folder``, or None."""
    path = Path(folder) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def reopen(record: dict) -> Tracker:
    """A tracker on the store a recorded run lives in (no probe beyond the first call's guard)."""
    _client_defaults()
    return Tracker(uri=record["tracking_uri"], experiment=record.get("experiment", "cxr"), experiment_id=record.get("experiment_id"), enabled=True)


def training_tags(run, stage: str) -> dict[str, str]:
    """Tags every cxr run carries: which stage, which run directory, which code."""
    return {"cxr.stage": stage, "cxr.run_dir": str(Path(run.root).resolve()), "cxr.code_version": code_version()}


def training_params(run, cfg) -> dict[str, Any]:
    """A training's parameters: the whole training config (and the strategy it resolved to) and the
    data it learned from (``data.*``: manifest rows, split seed, splits hash, shards)."""
    from pipelines.lineage import data_fingerprint

    return {**cfg.to_dict(), "effective_loss": cfg.effective_loss, "effective_freeze": cfg.effective_freeze,
            "data": data_fingerprint(run), "code_version": code_version()}


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The figures of an evaluation's or a cross-validation's ``metrics.json`` worth comparing across
    runs: mean AUROC with its interval, each finding's AUROC, AP and interval (and ECE when present),
    each baseline and the model's difference from it with its interval."""
    out: dict[str, Any] = {}
    mean = metrics.get("mean") or {}
    out.update(mean_auroc=mean.get("auroc"), mean_auroc_ci_low=mean.get("ci_low"), mean_auroc_ci_high=mean.get("ci_high"),
               mean_ap=mean.get("ap"), n_images=metrics.get("n_images"), n_patients=metrics.get("n_patients"))
    for finding, v in (metrics.get("per_finding") or {}).items():
        for key in ("auroc", "ci_low", "ci_high", "ap", "ece"):
            out[f"{finding}.{key}"] = v.get(key)
    for name, b in (metrics.get("baselines") or {}).items():
        for key in ("mean_auroc", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high"):
            out[f"baseline.{name}.{key}"] = b.get(key)
    return finite_metrics({k: v for k, v in out.items() if v is not None})


def tag_registered(record: dict | None, tags: dict[str, Any]) -> dict[str, str] | None:
    """Tag the model version a training registered (its ``tracking.json`` says which) with ``tags``."""
    registered = (record or {}).get("registered")
    if not registered:
        return None
    tracker = reopen(record)
    client = tracker.call("opening the model registry", tracker._client)
    if client is None:
        return None
    for key, value in tags.items():
        tracker.call(f"tagging {registered['name']} version {registered['version']}",
                     lambda k=key, v=value: client.set_model_version_tag(registered["name"], registered["version"], k, str(v)))
    return registered if tracker.enabled else None


def attach_files(record: dict | None, files: Iterable[Path], artifact_path: str | None = None) -> None:
    """Add files to a recorded run after it ended (the report and the card join the evaluation's run)."""
    if record:
        reopen(record).log_files(record["run_id"], files, artifact_path)
