"""The ``cxr`` command line: one verb per stage, each reading and writing a run directory."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.errors import UserInputError
from pipelines.rundir import RunDir

DEFAULTS = {
    "test_frac": 0.15,
    "val_frac": 0.15,
    "min_positives": 10,
    "seed": 0,
    "image_size": 224,
    "max_reject_frac": 0.2,  # pipelines/reject_guard.py DEFAULT_MAX_REJECT_FRAC (not imported: keeps --help fast)
}


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, metavar="DIR", help="the run directory every stage reads from and writes to")


def _collection_args(p: argparse.ArgumentParser) -> None:
    """A collection to ingest (``cxr ingest`` and ``cxr external`` read one the same way)."""
    p.add_argument("--source", required=True, choices=["nih", "chexpert", "manifest"], help="the label file's format")
    p.add_argument("--csv", required=True, type=Path, help="the label file (NIH Data_Entry_2017*.csv[.gz], CheXpert train.csv, or a manifest .csv/.parquet)")
    p.add_argument("--images", required=True, type=Path, help="the image root; label-file paths are relative to it")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--cohort", default=None, metavar="NAME", help="the cohort (collection, site) of every image: the manifest's cohort column")
    group.add_argument("--cohorts", default=None, type=Path, metavar="CSV", help="a CSV of image id, cohort (NIH's 'Image Index' header accepted): each image's cohort")


def _warn_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warn-only", action="store_true", help="report table-level validation failures but continue (default: stop with exit code 1)")


def _max_reject_frac(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-reject-frac", type=float, default=DEFAULTS["max_reject_frac"], metavar="FRAC",
        help="stop, writing nothing, when one reason would quarantine more than this fraction of the rows "
        "(rows whose image is absent on disk are not counted); 1 turns the guard off",
    )


def _train_args(p: argparse.ArgumentParser, tune: bool = False) -> None:
    """Every TrainConfig knob as an option, with TrainConfig's own defaults."""
    from trainers.config import BACKBONE_CHOICES, FREEZE_CHOICES, LOSS_CHOICES, SAMPLING_CHOICES, UNCERTAIN_CHOICES, TrainConfig  # noqa: PLC0415

    d = TrainConfig()
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, default=d.backbone, help="torchvision backbone")
    p.add_argument("--weights", default=d.weights, help="'imagenet' (torchvision's, from the local cache offline), 'none', or the path of a local state_dict")
    if not tune:
        p.add_argument("--freeze", choices=FREEZE_CHOICES, default=d.freeze, help="none: fine-tune all; partial: last block + head; backbone: head only")
        p.add_argument("--loss", choices=LOSS_CHOICES, default=d.loss, help="weighted BCE (per-finding, from the train split), plain bce, or auto (weighted unless resampling)")
        p.add_argument("--sampling", choices=SAMPLING_CHOICES, default=d.sampling, help="over: repeat images with rare findings; under: drop all-negative images; per epoch")
        p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (cosine schedule)")
    p.add_argument("--uncertain", choices=UNCERTAIN_CHOICES, default=d.uncertain, help="-1 labels: U-Zeros, U-Ones, or ignored in loss and AUROC")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (the maximum per trial under tune)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (DDP)")
    p.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker, help="GPUs per worker (0: CPU; fractions allowed)")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs per worker (leave some for Ray Data reads)")
    p.add_argument("--no-augment", action="store_true", help="turn off train-split augmentation (rotation, shift, scale, contrast)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="best N checkpoints kept, by validation mean AUROC")
    p.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts from the last checkpoint before giving up")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")


def train_config_from(args: argparse.Namespace):
    from trainers.config import TrainConfig  # noqa: PLC0415

    values = {
        k: getattr(args, k)
        for k in ("backbone", "weights", "freeze", "loss", "sampling", "lr", "uncertain", "epochs", "batch_size", "weight_decay", "workers", "gpus_per_worker", "cpus_per_worker", "keep_checkpoints", "max_failures", "seed")
        if hasattr(args, k)
    }
    return TrainConfig(**values, augment=not args.no_augment)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserInputError(f"{option} expects comma-separated numbers, got {text!r}") from None


def _columns(text: str | None) -> list[str] | None:
    """``--subgroups a,b`` as a list; None (the default columns) when not given."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray pipeline on Ray: ingest, validate, split, preprocess, explore, train, tune, evaluate, explain, report; run it all from one config, locally or as a Ray job.", formatter_class=fmt)
    parser.add_argument("--version", action="version", version="cxr 0.1.0")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("ingest", help="read a collection's label file into manifest.parquet + quarantine.parquet", formatter_class=fmt)
    _run_arg(p)
    _collection_args(p)
    _warn_only(p)
    _max_reject_frac(p)

    p = verbs.add_parser("validate", help="run the Great Expectations suites on the manifest (and splits, if present)", formatter_class=fmt)
    _run_arg(p)
    _warn_only(p)
    _max_reject_frac(p)

    p = verbs.add_parser("split", help="patient-level train/val/test split with a leakage audit", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--test-frac", type=float, default=DEFAULTS["test_frac"], help="fraction of images for the test split (drawn first)")
    p.add_argument("--val-frac", type=float, default=DEFAULTS["val_frac"], help="fraction of images for the validation split (drawn second)")
    p.add_argument("--min-positives", type=int, default=DEFAULTS["min_positives"], help="positive images of each finding that test and val should hold, where the data allows")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed: same seed, same split")
    _warn_only(p)

    p = verbs.add_parser("preprocess", help="Ray Data: decode, 8-bit grayscale, resize, write Parquet shards, train-only stats", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="side of the square output images in pixels")
    p.add_argument("--blocks", type=int, default=None, help="Ray Data read blocks (default: about 4 per CPU, at most 64 images each)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    p = verbs.add_parser("eda", help="exploratory analysis: figures + summary.md/html in <run>/eda", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--sample-size", type=int, default=64, help="images sampled for the pixel-intensity histograms")
    p.add_argument("--seed", type=int, default=0, help="random seed for the image samples")

    p = verbs.add_parser("train", help="Ray Train: fine-tune a backbone on the shards, checkpoints in <run>/train", formatter_class=fmt)
    _run_arg(p)
    _train_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    p = verbs.add_parser("tune", help="Ray Tune: search sampling x loss x freeze x lr with ASHA; table in <run>/tune", formatter_class=fmt)
    _run_arg(p)
    _train_args(p, tune=True)
    p.add_argument("--space", type=Path, default=None, help="YAML search space replacing the default grid (see tuning/space.py)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the continuous axes (lr) per grid point")
    p.add_argument("--sampling-grid", default="none,over,under", help="sampling strategies searched (default grid)")
    p.add_argument("--loss-grid", default="bce,weighted", help="losses searched (default grid)")
    p.add_argument("--freeze-grid", default="none,partial,backbone", help="freeze strategies searched (default grid)")
    p.add_argument("--lr-range", default="1e-4,3e-3", help="log-uniform learning-rate range searched")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    p.add_argument("--grace-period", type=int, default=1, help="epochs every trial runs before ASHA may stop it")
    p.add_argument("--resume", action="store_true", help="resume an interrupted search in <run>/tune")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    p = verbs.add_parser("evaluate", help="test-split metrics with patient-bootstrap CIs, operating points, calibration, robustness, subgroups", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: <run>/tune/best, else <run>/train/best)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (patients resampled)")
    p.add_argument("--no-robustness", action="store_true", help="skip the perturbation sweep")
    p.add_argument("--subgroups", default=None, metavar="COL[,COL...]", help="manifest columns to break results down by (at most 20 values each; default: every one of sex, age_band, view, cohort present)")

    p = verbs.add_parser("external", help="external validation: ingest, gate, preprocess and score a second collection into <run>/external/NAME", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--name", required=True, help="the external set's name: its folder under <run>/external/")
    _collection_args(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: <run>/tune/best, else <run>/train/best)")
    p.add_argument("--drop-overlap", action="store_true", help="quarantine images whose patient or image id is in the run's train/val split (default: refuse the set)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (patients resampled)")
    p.add_argument("--subgroups", default=None, metavar="COL[,COL...]", help="manifest columns to break results down by (default as cxr evaluate)")
    _max_reject_frac(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    p = verbs.add_parser("explain", help="Grad-CAM heatmaps per predicted finding; pointing game against radiologist boxes", formatter_class=fmt)
    p.add_argument("--run", type=Path, metavar="DIR", default=None, help="explain a run: gallery of test images and the pointing game (needs cxr evaluate)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default for a run: tune/best, else train/best)")
    p.add_argument("--images", type=Path, nargs="+", default=None, help="explain these image files instead of a run (needs --checkpoint and --out)")
    p.add_argument("--out", type=Path, default=None, help="output folder for --images")
    p.add_argument("--boxes", type=Path, default=None, help="an NIH-style BBox_List csv for --images (pointing game)")
    p.add_argument("--max-images", type=int, default=24, help="images in a run's gallery")

    p = verbs.add_parser("report", help="one self-contained HTML page for the run: <run>/report.html", formatter_class=fmt)
    _run_arg(p)

    p = verbs.add_parser("predict", help="the 14 finding probabilities for image files, from a checkpoint alone", formatter_class=fmt)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (model.pt + model.json)")
    p.add_argument("images", type=Path, nargs="+", help="PNG/JPEG/DICOM files")
    p.add_argument("--csv", type=Path, default=None, help="also write the probabilities to this CSV")

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

    p = verbs.add_parser("demo", help="make a synthetic collection and run every stage on it, locally", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--patients", type=int, default=120, help="synthetic patients (about 2.5 images each)")
    p.add_argument("--image-size", type=int, default=112, help="preprocessed image side in pixels (Grad-CAM needs >= 112 for a 4x4 feature map)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the collection and the split")
    p.add_argument("--no-tune", action="store_true", help="skip the strategy search (faster)")
    return parser


def dispatch(args: argparse.Namespace) -> str:
    from cxr import stages  # noqa: PLC0415 - keep --help fast

    if args.verb == "run":
        from cxr.config import load_config  # noqa: PLC0415
        from cxr.pipeline import plan_pipeline, run_pipeline  # noqa: PLC0415

        config = load_config(args.config, args.overrides)
        if args.address:
            config.run.address = args.address
        return plan_pipeline(config, force=args.force) if args.dry_run else run_pipeline(config, force=args.force)
    if args.verb == "predict":
        from evaluation import format_predictions, predict_images  # noqa: PLC0415

        frame = predict_images(args.checkpoint, list(args.images))
        if args.csv:
            frame.to_csv(args.csv, index=False)
        return format_predictions(frame) + (f"\nwrote {args.csv}" if args.csv else "")
    if args.verb == "explain" and args.images:
        from evaluation import explain  # noqa: PLC0415
        from pipelines.sources.nih import read_boxes  # noqa: PLC0415

        if not args.checkpoint or not args.out:
            raise UserInputError("explain --images needs --checkpoint and --out")
        result = explain(args.checkpoint, list(args.images), args.out, boxes=read_boxes(args.boxes) if args.boxes else None)
        return "\n".join([f"explain: {len(result.images)} Grad-CAM overlay(s) in {result.out_dir}", stages._pointing_line(result.summary)])
    if args.verb == "explain" and not args.run:
        raise UserInputError("explain needs --run DIR, or --images with --checkpoint and --out")
    run = RunDir(args.run)
    if args.verb == "evaluate":
        return stages.evaluate_stage(run, args.checkpoint, n_boot=args.bootstrap, robustness=not args.no_robustness, subgroups=_columns(args.subgroups))
    if args.verb == "external":
        from cxr.runtime import ray_session  # noqa: PLC0415

        with ray_session(args.address):
            return stages.external_stage(run, args.name, args.source, args.csv, args.images, cohort=args.cohort, cohorts=args.cohorts,
                                         checkpoint=args.checkpoint, drop_overlap=args.drop_overlap, n_boot=args.bootstrap,
                                         max_reject_frac=args.max_reject_frac, subgroups=_columns(args.subgroups))
    if args.verb == "explain":
        return stages.explain_stage(run, args.checkpoint, max_images=args.max_images)
    if args.verb == "report":
        return stages.report_stage(run)
    if args.verb == "ingest":
        return stages.ingest_stage(run, args.source, args.csv, args.images, warn_only=args.warn_only, max_reject_frac=args.max_reject_frac, cohort=args.cohort, cohorts=args.cohorts)
    if args.verb == "validate":
        return stages.validate_stage(run, warn_only=args.warn_only, max_reject_frac=args.max_reject_frac)
    if args.verb == "split":
        return stages.split_stage(run, args.test_frac, args.val_frac, args.min_positives, args.seed, warn_only=args.warn_only)
    if args.verb == "preprocess":
        from cxr.runtime import ray_session  # noqa: PLC0415

        with ray_session(args.address):
            return stages.preprocess_stage(run, args.image_size, num_blocks=args.blocks)
    if args.verb == "eda":
        return stages.eda_stage(run, sample_size=args.sample_size, seed=args.seed)
    if args.verb == "train":
        from cxr.runtime import ray_session  # noqa: PLC0415

        cfg = train_config_from(args)
        with ray_session(args.address):
            return stages.train_stage(run, cfg)
    if args.verb == "tune":
        from cxr.runtime import ray_session  # noqa: PLC0415
        from tuning.space import default_space, load_space  # noqa: PLC0415

        base = train_config_from(args)
        if args.space:
            space = load_space(args.space)
        else:
            low, high = _floats(args.lr_range, "--lr-range")
            space = default_space(lr=(low, high), sampling=args.sampling_grid.split(","), loss=args.loss_grid.split(","), freeze=args.freeze_grid.split(","))
        with ray_session(args.address):
            return stages.tune_stage(run, base, space, args.num_samples, asha=not args.no_asha, resume=args.resume, grace_period=args.grace_period)
    if args.verb == "demo":
        from cxr.demo import run_demo  # noqa: PLC0415

        return run_demo(run, patients=args.patients, image_size=args.image_size, seed=args.seed, tune=not args.no_tune)
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    from cxr.runtime import quiet_environment  # noqa: PLC0415

    quiet_environment()
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        if args.verb in ("submit", "jobs"):  # they print as they go; the exit status is the job's
            from cxr.jobs import command  # noqa: PLC0415

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
    import pickle  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from pipelines.errors import CxrError, is_path_error  # noqa: PLC0415

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
    import pickle  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from pipelines.errors import CxrError, describe_path_error  # noqa: PLC0415

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
