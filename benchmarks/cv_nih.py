"""The documented 5-fold cross-validation on the shared NIH subset (docs/cv_nih.md).

Builds nothing itself: the run directory comes from the ordinary CLI (``cxr ingest`` with
``--cohorts``, ``cxr split``, ``cxr preprocess``); this calls :func:`cxr.cv.run_cv` on it on an
embedded local Ray, prints one line per finished fold and the closing summary, and writes the wall
time beside ``<run>/cv/metrics.json``.

    nice -n 10 .venv/bin/python benchmarks/cv_nih.py --run /tmp/cvnih --folds 5 --epochs 5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.cv import cv_summary, run_cv  # noqa: E402
from cxr.runtime import ray_session  # noqa: E402
from pipelines.atomic import write_json  # noqa: E402
from pipelines.rundir import RunDir  # noqa: E402
from trainers import TrainConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--workers", type=int, default=1, help="Train workers per fold (1: two folds train side by side on 2 CPUs)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    base = TrainConfig(backbone=args.backbone, weights="none", freeze="none", epochs=args.epochs, workers=args.workers, seed=args.seed)
    run = RunDir(args.run)
    start = time.monotonic()
    with ray_session():
        result = run_cv(run, base, args.folds, seed=args.seed, resume=args.resume, n_boot=args.bootstrap,
                        progress=lambda line: print(line, flush=True))
    seconds = time.monotonic() - start
    print(cv_summary(result))
    print(f"wall time {seconds / 60:.1f} min")
    write_json(run.cv / "wall_time.json", {"seconds": seconds, "command": sys.argv, "train_config": json.loads(json.dumps(base.to_dict()))})


if __name__ == "__main__":
    main()
