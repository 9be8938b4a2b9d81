"""The ``cxr`` command line: one verb per stage, each reading and writing a run directory."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.settings import (
    RAY_STAGES, CardSection, CvSection, DataSection, DemoSettings, EdaSection, EvaluateSection, ExplainImages, ExplainSection, ExternalSet,
    PredictSettings, PreprocessSection, RunSection, ScoreSettings, ServeApp, ServeSettings, SplitSection, TrackingSection, TuneSection,
    ValidateSection,
)
from pipelines.errors import UserInputError
from pipelines.rundir import RunDir
from trainers.config import STRATEGY_AXES, TrainConfig

# The verbs: which settings sections each one's options come from, whether it takes --run and starts
# Ray (--address), and the stage it runs. Options, defaults and help live on the sections
# (cxr/settings.py, trainers/config.py); this table only says which verb shows which.


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    sections: tuple[tuple[str, type, tuple[str, ...]], ...] = ()  # (key, settings class, excluded fields)
    run: str = "required"  # --run DIR: required, optional or absent ("")
    run_help: str = ""  # what --run does when it is optional

    @property
    def ray(self) -> bool:
        """Starts (or joins) Ray, with --address: the same stages start Ray under `cxr run`."""
        return self.name in RAY_STAGES


TRAIN = ("train", TrainConfig, ())
TRACKING = ("tracking", TrackingSection, ())
TRACKING_NO_REGISTER = ("tracking", TrackingSection, ("register",))  # cv folds and evaluations are not deployed models
VERBS = (
    Verb("ingest", "read a collection's label file into manifest.parquet + quarantine.parquet", (("data", DataSection, ()),)),
    Verb("validate", "run the Great Expectations suites on the manifest (and splits, if present)", (("validate", ValidateSection, ()),)),
    Verb("split", "patient-level train/val/test split with a leakage audit", (("split", SplitSection, ()),)),
    Verb("preprocess", "Ray Data: decode, 8-bit grayscale, resize, write Parquet shards, train-only stats", (("preprocess", PreprocessSection, ()),)),
    Verb("eda", "exploratory analysis: figures + summary.md/html in <run>/eda", (("eda", EdaSection, ()),)),
    Verb("train", "Ray Train: fine-tune a backbone on the shards, checkpoints in <run>/train; tracked in MLflow", (TRAIN, TRACKING)),
    Verb("tune", "Ray Tune: search sampling x loss x freeze x lr with ASHA; table in <run>/tune; trials tracked in MLflow",
         (("train", TrainConfig, STRATEGY_AXES), ("tune", TuneSection, ()), TRACKING)),
    Verb("cv", "patient-grouped k-fold cross-validation of the training recipe: folds as concurrent Ray Tune trials; <run>/cv",
         (TRAIN, ("cv", CvSection, ()), TRACKING_NO_REGISTER)),
    Verb("evaluate", "test-split metrics with patient-bootstrap CIs beside two baselines, operating points, calibration, robustness, subgroups",
         (("evaluate", EvaluateSection, ()), TRACKING_NO_REGISTER)),
    Verb("external", "external validation: ingest, gate, preprocess and score a second collection into <run>/external/NAME",
         (("external", ExternalSet, ()),)),
    Verb("explain", "Grad-CAM heatmaps per predicted finding; pointing game against radiologist boxes",
         (("explain", ExplainSection, ()), ("images", ExplainImages, ())), run="optional",
         run_help=" (explain a run: gallery of test images and the pointing game; needs cxr evaluate)"),
    Verb("card", "the model card: <run>/model_card.md + model_card.json, every fact and limitation read from the run's files",
         (("card", CardSection, ()),)),
    Verb("report", "one self-contained HTML page for the run: <run>/report.html"),
    Verb("predict", "the 14 finding probabilities for image files, from a checkpoint alone", (("predict", PredictSettings, ()),), run=""),
    Verb("score", "Ray Data batch inference: score a folder, a manifest or a run's split with an actor pool; probabilities, calls, OOD flag",
         (("score", ScoreSettings, ()),), run="optional",
         run_help=" (score this run's --split with its checkpoint and its validation thresholds; instead of --images/--manifest)"),
    Verb("serve", "Ray Serve: an HTTP endpoint for one image at a time (POST /predict), batched on the server; probabilities, calls, OOD flag, Grad-CAM",
         (("serve", ServeApp, ()), ("http", ServeSettings, ())), run=""),
    Verb("demo", "make a synthetic collection and run every stage on it, locally", (("demo", DemoSettings, ()),)),
)


def _add_verb(verbs, verb: Verb, fmt) -> None:
    from cxr.options import add_options

    p = verbs.add_parser(verb.name, help=verb.help, formatter_class=fmt)
    if verb.run:
        required = verb.run == "required"
        p.add_argument("--run", required=required, default=None, type=Path, metavar="DIR",
                       help="the run directory every stage reads from and writes to" + verb.run_help)
    for key, cls, exclude in verb.sections:
        add_options(p, cls, key, exclude)
    if verb.ray:
        add_options(p, RunSection, "run", exclude=("dir", "num_cpus", "scratch"))


def settings_from(args: argparse.Namespace, verb: Verb) -> dict[str, Any]:
    """Each of the verb's sections, built from its options."""
    from cxr.options import from_args

    return {key: from_args(args, cls, key, exclude) for key, cls, exclude in verb.sections}


def build_parser() -> argparse.ArgumentParser:
    from cxr.options import HelpFormatter

    fmt = HelpFormatter
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray pipeline on Ray: ingest, validate, split, preprocess, explore, train, tune, evaluate, explain, report; run it all from one config, locally or as a Ray job.", formatter_class=fmt)
    parser.add_argument("--version", action="version", version="cxr 0.1.0")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        _add_verb(verbs, verb, fmt)

    # The verbs that drive whole runs take a config, not stage settings.
    p = verbs.add_parser("run", help="every stage in order from one YAML config; stages already done are skipped", formatter_class=fmt)
    p.add_argument("config", type=Path, help="the run's YAML config (configs/demo.yaml, configs/nih.yaml); relative paths in it are relative to its folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one config value, e.g. --set train.epochs=2 (repeatable; the value is read as YAML)")
    p.add_argument("--force", action="store_true", help="re-run every stage, even those already done")
    p.add_argument("--address", default=None, help="Ray address, e.g. auto to join a running cluster ; unset: run.address, else RAY_ADDRESS, else an embedded local Ray")
    p.add_argument("--dry-run", action="store_true", help="print which stages would run and why; run nothing")

    p = verbs.add_parser("submit", help="run `cxr run CONFIG` as a Ray job on a cluster; follows its logs, exits with its status", formatter_class=fmt)
    p.add_argument("config", type=Path, help="the run's YAML config; must lie inside --working-dir (uploaded with the job)")
    p.add_argument("--address", default=None, help="the Ray job server, e.g. http://127.0.0.1:8265 through an SSH tunnel or port-forward; unset: RAY_ADDRESS")
    p.add_argument("--working-dir", type=Path, default=Path("."), help="folder uploaded as the job's working dir (.venv, runs, .git, data files excluded)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable for the job (repeatable; GX_ANALYTICS_ENABLED=false and RAY_DATA_DISABLE_PROGRESS_BARS=1 are always set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override passed on to `cxr run` (repeatable)")
    p.add_argument("--force", action="store_true", help="pass --force to `cxr run`")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")

    p = verbs.add_parser("jobs", help="list, inspect, follow or stop Ray jobs", formatter_class=fmt)
    actions = p.add_subparsers(dest="jobs_verb", required=True, metavar="ACTION")
    for action, text in (("list", "every job the cluster knows, newest first"), ("status", "one job's status and message"),
                         ("logs", "one job's logs (--follow: stream until it ends, exit with its status)"), ("stop", "stop a running job")):
        q = actions.add_parser(action, help=text, formatter_class=fmt)
        if action != "list":
            q.add_argument("job_id", help="the id `cxr submit` printed (raysubmit_...)")
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
        q.add_argument("--address", default=None, help="the Ray job server; unset: RAY_ADDRESS")
    return parser


def dispatch(args: argparse.Namespace) -> str:
    if args.verb == "run":
        from cxr.config import load_config
        from cxr.pipeline import plan_pipeline, run_pipeline

        config = load_config(args.config, args.overrides)
        if args.address:
            config.run.address = args.address
        return plan_pipeline(config, force=args.force) if args.dry_run else run_pipeline(config, force=args.force)
    verb = next(v for v in VERBS if v.name == args.verb)
    settings = settings_from(args, verb)
    run = RunDir(args.run) if getattr(args, "run", None) else None
    if verb.ray:
        from cxr.runtime import ray_session

        if "train" in settings:  # missing starting weights fail now, before Ray starts
            from trainers.weights import check_available

            check_available(settings["train"].weights, settings["train"].backbone, settings["train"].weights_dir)
        if verb.name == "serve":  # a wrong checkpoint or a busy port fail now, before Ray starts
            from cxr.stages import check_serve

            import os

            check_serve(settings["serve"], settings["http"], port=not (getattr(args, "run.address") or os.environ.get("RAY_ADDRESS")))

        with ray_session(getattr(args, "run.address")):
            return run_verb(verb.name, run, settings)
    return run_verb(verb.name, run, settings)


def run_verb(name: str, run: RunDir | None, s: dict[str, Any]) -> str:
    """The stage a verb runs, handed the sections its options built (``cxr run`` hands the same
    stage functions the sections it read from YAML: cxr/pipeline.py)."""
    from cxr import stages

    if name == "predict":
        return stages.predict_stage(s["predict"])
    if name == "score":
        return stages.score_stage(run, s["score"])
    if name == "serve":
        return stages.serve_stage(s["serve"], s["http"])
    if name == "explain" and s["images"].images:
        return stages.explain_images_stage(s["images"], s["explain"])
    if run is None:
        raise UserInputError(f"{name} needs --run DIR" + (", or --images with --checkpoint and --out" if name == "explain" else ""))
    if name == "demo":
        from cxr.demo import run_demo

        return run_demo(run, s["demo"])
    if name == "train":
        return stages.train_stage(run, s["train"], s["tracking"])
    if name == "tune":
        return stages.tune_stage(run, s["tune"], s["train"], s["tracking"])
    if name == "cv":
        return stages.cv_stage(run, s["cv"], s["train"], s["tracking"])
    if name == "evaluate":
        return stages.evaluate_stage(run, s["evaluate"], s["tracking"])
    if name == "report":
        return stages.report_stage(run)
    if name == "explain":
        return stages.explain_stage(run, s["explain"])
    (section,) = s.values()
    return getattr(stages, f"{name}_stage")(run, section)


def main(argv: list[str] | None = None) -> int:
    from cxr.runtime import quiet_environment

    quiet_environment()
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        if args.verb in ("submit", "jobs"):  # they print as they go; the exit status is the job's
            from cxr.jobs import command

            return command(args)
        summary = dispatch(args)
    except KeyboardInterrupt:
        print("cxr: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a user error ends as one readable line and exit 1; a bug keeps its traceback
        message = user_error_message(err)
        if message is None:
            raise
        print(f"cxr {args.verb}: error: {message}", file=sys.stderr)
        return 1
    print(summary)
    print(f"cxr {args.verb}: done in {time.monotonic() - started:.1f}s")
    return 0


def _is_user_error(err: BaseException) -> bool:
    """Errors about the input, the options or the run directory, as opposed to bugs (which keep
    their traceback): the project's own ``CxrError`` types, ``OSError`` on a path the user named,
    ``ConnectionError`` (an unreachable cluster), a file that cannot be unpickled safely, and YAML
    the user wrote that cannot be read; also any of these raised inside a Ray task or a Ray Train
    worker. A plain ``ValueError``, ``KeyError`` ... is a bug."""
    return _user_error(err) is not None


def _plain_user_error(err: BaseException) -> bool:
    import pickle

    import yaml

    from pipelines.errors import CxrError, is_path_error

    return isinstance(err, (CxrError, ConnectionError, pickle.UnpicklingError, yaml.YAMLError)) or is_path_error(err)


def _user_error(err: BaseException) -> BaseException | None:
    """The user error ``err`` is or carries, else None. Ray re-raises a task's exception as a
    RayTaskError that keeps the original as ``cause``; Ray Train's WorkerGroupError keeps each
    worker's as ``worker_failures``: a user error in every failed worker is the user's."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err and _plain_user_error(cause):
        return cause
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures and all(_plain_user_error(e) for e in failures.values()):
        return next(iter(failures.values()))
    return err if _plain_user_error(err) else None


def user_error_message(err: BaseException) -> str | None:
    """The one line ``cxr`` prints for a user error; None for a bug (the caller re-raises it)."""
    import pickle

    import yaml

    from pipelines.errors import CxrError, describe_path_error

    err = _user_error(err)
    if err is None:
        return None
    if isinstance(err, CxrError):
        return str(err)
    if isinstance(err, OSError) and not isinstance(err, ConnectionError):
        return describe_path_error(err)
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a file: the first line says why
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"a file holds pickled objects that cannot be loaded safely (weights_only=True): {first}"
    if isinstance(err, yaml.YAMLError):
        return " ".join(str(err).split())
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
