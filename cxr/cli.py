"""The ``cxr`` command line: one verb per stage, each reading and writing a run directory."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.rundir import RunDir

DEFAULTS = {
    "test_frac": 0.15,
    "val_frac": 0.15,
    "min_positives": 10,
    "seed": 0,
    "image_size": 224,
}


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, metavar="DIR", help="the run directory every stage reads from and writes to")


def _warn_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warn-only", action="store_true", help="report table-level validation failures but continue (default: stop with exit code 1)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray pipeline on Ray: ingest, validate, split, preprocess, explore.", formatter_class=fmt)
    parser.add_argument("--version", action="version", version="cxr 0.1.0")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("ingest", help="read a collection's label file into manifest.parquet + quarantine.parquet", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--source", required=True, choices=["nih", "chexpert", "manifest"], help="the label file's format")
    p.add_argument("--csv", required=True, type=Path, help="the label file (NIH Data_Entry_2017*.csv[.gz], CheXpert train.csv, or a manifest .csv/.parquet)")
    p.add_argument("--images", required=True, type=Path, help="the image root; label-file paths are relative to it")
    _warn_only(p)

    p = verbs.add_parser("validate", help="run the Great Expectations suites on the manifest (and splits, if present)", formatter_class=fmt)
    _run_arg(p)
    _warn_only(p)

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
    p.add_argument("--blocks", type=int, default=None, help="Ray Data read blocks (default: about one per 16 images, at least 8)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    p = verbs.add_parser("eda", help="exploratory analysis: figures + summary.md/html in <run>/eda", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--sample-size", type=int, default=64, help="images sampled for the pixel-intensity histograms")
    p.add_argument("--seed", type=int, default=0, help="random seed for the image samples")

    p = verbs.add_parser("demo", help="make a synthetic collection and run every stage on it, locally", formatter_class=fmt)
    _run_arg(p)
    p.add_argument("--patients", type=int, default=120, help="synthetic patients (about 2.5 images each)")
    p.add_argument("--image-size", type=int, default=64, help="preprocessed image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed for the collection and the split")
    return parser


def dispatch(args: argparse.Namespace) -> str:
    from cxr import stages  # noqa: PLC0415 - keep --help fast

    run = RunDir(args.run)
    if args.verb == "ingest":
        return stages.ingest_stage(run, args.source, args.csv, args.images, warn_only=args.warn_only)
    if args.verb == "validate":
        return stages.validate_stage(run, warn_only=args.warn_only)
    if args.verb == "split":
        return stages.split_stage(run, args.test_frac, args.val_frac, args.min_positives, args.seed, warn_only=args.warn_only)
    if args.verb == "preprocess":
        from cxr.runtime import ray_session  # noqa: PLC0415

        with ray_session(args.address):
            return stages.preprocess_stage(run, args.image_size, num_blocks=args.blocks)
    if args.verb == "eda":
        return stages.eda_stage(run, sample_size=args.sample_size, seed=args.seed)
    if args.verb == "demo":
        from cxr.demo import run_demo  # noqa: PLC0415

        return run_demo(run, patients=args.patients, image_size=args.image_size, seed=args.seed)
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    from cxr.runtime import quiet_environment  # noqa: PLC0415

    quiet_environment()
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        summary = dispatch(args)
    except KeyboardInterrupt:
        print("cxr: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure ends as one readable line and a non-zero exit
        if _is_user_error(err):
            print(f"cxr {args.verb}: error: {err}", file=sys.stderr)
            return 1
        raise
    print(summary)
    print(f"cxr {args.verb}: done in {time.monotonic() - started:.1f}s")
    return 0


def _is_user_error(err: Exception) -> bool:
    """Errors about the input or the run directory, as opposed to bugs (which keep their traceback)."""
    from pipelines.manifest import ContractError  # noqa: PLC0415
    from pipelines.split import LeakageError  # noqa: PLC0415

    user_errors: tuple[type[Exception], ...] = (FileNotFoundError, ContractError, LeakageError, ValueError)
    try:
        from validation import ValidationFailed  # noqa: PLC0415

        user_errors += (ValidationFailed,)
    except ImportError:
        pass
    return isinstance(err, user_errors)


if __name__ == "__main__":
    sys.exit(main())
