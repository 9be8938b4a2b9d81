"""Training throughput fed by Ray Data from the shards, against the same loop fed from tensors
already in memory (the upper bound), in one run.

Both runs call ``trainers.trainer.fit`` with identical settings; only ``TrainConfig.ingest`` differs:
``ray_data`` streams the shards each epoch (read, decode the rows to arrays in Ray Data tasks,
split among the workers, local shuffle, prefetch), ``memory`` loads the training split into the
object store once and each worker slices its batches from it, so no ingest cost remains. The first
epoch is warm-up (process and pipeline start); throughput is the mean over the later epochs of
(images trained by all workers) / (the slowest worker's time for the epoch's training loop).

    .venv/bin/python benchmarks/train_ingest.py                  # synthetic shards, CPU defaults
    .venv/bin/python benchmarks/train_ingest.py --run runs/nih --image-size 0 --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tests.train_fixtures, trainers
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from cxr.runtime import ray_session
from pipelines.rundir import RunDir
from tests.train_fixtures import write_run
from trainers.config import TrainConfig
from trainers.trainer import fit


def throughput(history, warmup: int) -> tuple[float, float]:
    """Mean over the measured epochs of whole-epoch images/s, and of images/s once the first batch
    had arrived (the steady state, without the pipeline's per-epoch start-up)."""
    later = history[history["epoch"] > warmup]
    steady = later["train_images"] / (later["train_seconds"] - later["train_first_batch_s"])
    return float(later["train_images_per_s"].mean()), float(steady.mean())


def measure(run: Path, cfg: TrainConfig, storage: str, warmup: int) -> dict:
    start = time.perf_counter()
    result = fit(RunDir(run), cfg, storage_path=storage, name=f"bench-{cfg.ingest}-{time.time_ns()}")
    history = result.metrics_history
    epoch_rate, steady_rate = throughput(history, warmup)
    return {
        "ingest": cfg.ingest,
        "images_per_s": epoch_rate,
        "steady_images_per_s": steady_rate,
        "per_epoch_images_per_s": [round(v, 2) for v in history["train_images_per_s"]],
        "first_batch_s": [round(v, 2) for v in history["train_first_batch_s"]],
        "train_images_per_epoch": int(history["train_images"].iloc[-1]),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def median_run(rows: list[dict]) -> dict:
    """The repeat with the median throughput, with every repeat's figure alongside."""
    ordered = sorted(rows, key=lambda r: r["images_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats_images_per_s": [round(r["images_per_s"], 2) for r in rows]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a run directory with shards/ and stats.json (default: synthetic shards)")
    p.add_argument("--images", type=int, default=1024, help="synthetic training images")
    p.add_argument("--image-size", type=int, default=128, help="synthetic image side")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per feed; the median is reported")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray")
    p.add_argument("--min-ratio", type=float, default=0.9, help="Ray Data / in-memory throughput the run must reach")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_ingest.json")
    args = p.parse_args(argv)
    if args.epochs <= args.warmup_epochs:
        p.error("--epochs must exceed --warmup-epochs: the warm-up epoch is not measured")

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or write_run(Path(tmp) / "run", n_train=args.images, n_val=max(32, args.images // 8), n_test=8,
                                    image_size=args.image_size, files=8)
        cfg = dict(backbone=args.backbone, weights="none", freeze="none", epochs=args.epochs, batch_size=args.batch_size,
                   workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                   keep_checkpoints=1)
        runs: dict[str, list[dict]] = {"ray_data": [], "memory": []}
        with ray_session(args.address, args.num_cpus):
            for _ in range(args.repeats):  # alternated, so drifting machine load hits both feeds alike
                for ingest in runs:
                    runs[ingest].append(measure(run, TrainConfig(ingest=ingest, **cfg), str(Path(tmp) / "ray"), args.warmup_epochs))
    streamed, in_memory = (median_run(runs[k]) for k in ("ray_data", "memory"))
    ratio = streamed["images_per_s"] / in_memory["images_per_s"]
    report = {
        "benchmark": "train_ingest",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ray_data": streamed,
        "memory": in_memory,
        "ratio": round(ratio, 3),
        "ok": ratio >= args.min_ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{'feed':<10} {'images/s':>9} {'steady':>9}  per epoch (first batch after s)")
    for row in (streamed, in_memory):
        print(f"{row['ingest']:<10} {row['images_per_s']:>9.1f} {row['steady_images_per_s']:>9.1f}  "
              f"{row['per_epoch_images_per_s']} ({row['first_batch_s']})")
    print(f"Ray Data / in-memory = {ratio:.3f} (needs >= {args.min_ratio}): {'OK' if report['ok'] else 'INGEST IS A BOTTLENECK'}")
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
