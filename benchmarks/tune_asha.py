"""Does ASHA save work? The same strategy search with and without early stopping, in one run.

The space has clearly bad arms (learning rates far too small or too large to learn in the budget)
beside good ones, on synthetic shards with a learnable signal. Reports trial-epochs spent and the
best strategy each search picked, then each search's per-trial table.

ASHA's saving grows with the epoch budget: with reduction factor 2 the rungs are at 1, 2, 4, ...
epochs, and half the trials at a rung go on to the next, so at 4 epochs even a perfect ASHA would
spend half the trial-epochs; 8 epochs leaves room to show it.

    .venv/bin/python -m benchmarks.tune_asha --epochs 8
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("CXR_OFFLINE", "1")

import pandas as pd
from ray import tune

from cxr.runtime import init_local_ray
from pipelines.rundir import RunDir
from tests.train_fixtures import write_run
from trainers import TrainConfig
from tuning import run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="max epochs per trial")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    import ray

    init_local_ray(2)
    base = TrainConfig(backbone="resnet18", weights="none", freeze="none", batch_size=16, workers=1, cpus_per_worker=0.5, shuffle_buffer=32, epochs=args.epochs)
    # Two good learning rates, two hopeless ones (1e-7 barely moves, 1.0 diverges), x two losses.
    space = {"lr": tune.grid_search([1e-7, 1e-3, 3e-3, 1.0]), "loss": tune.grid_search(["bce", "weighted"])}
    rows, tables = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for asha in (False, True):
            run = write_run(Path(tmp) / f"run_{asha}", n_train=96, n_val=48, image_size=args.image_size, seed=1)
            t0 = time.perf_counter()
            result = run_search(RunDir(run), base, space, asha=asha, grace_period=1, reduction_factor=2)
            best = result.table.iloc[0]
            tables["ASHA" if asha else "no early stopping"] = result.table[["lr", "loss", "status", "epochs", "best_val_mean_auroc", "best_epoch"]]
            rows.append({"search": "ASHA" if asha else "no early stopping", "trials": len(result.table), "trial-epochs": result.trial_epochs, "wall s": time.perf_counter() - t0, "best lr": best["lr"], "best loss": best["loss"], "best val mean AUROC": best["best_val_mean_auroc"]})
    ray.shutdown()
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nASHA / full trial-epochs: {rows[1]['trial-epochs'] / rows[0]['trial-epochs']:.2f}")
    for name, trials in tables.items():
        print(f"\n{name}:\n")
        print(trials.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
