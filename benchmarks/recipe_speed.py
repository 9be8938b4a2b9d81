"""Training images/s of a recipe (a config file's ``train:`` section, e.g. configs/nih-small.yaml)
against today's defaults at the same input size, in one run.

Three arms on the same shards, each through ``trainers.trainer.fit``: ``defaults`` is TrainConfig's
defaults (DenseNet121, last block and head trained; random weights stand in for ImageNet's, which
cost the same per image) with the recipe's workers and CPUs; ``recipe`` is the recipe as written;
``recipe+regularisers`` adds the regularisers docs/small_data.md tried (label smoothing, mixup,
EMA, head dropout), to show what they cost per image. Epoch 1 is warm-up; the arms alternate over
``--repeats`` so drifting machine load hits them alike.

    .venv/bin/python benchmarks/recipe_speed.py --recipe configs/nih-small.yaml --image-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from benchmarks.train_ingest import measure, median_run
from cxr.config import load_config
from cxr.runtime import ray_session
from tests.train_fixtures import write_run
from trainers.config import TrainConfig

SHARED = ("batch_size", "workers", "cpus_per_worker", "gpus_per_worker", "uncertain", "seed")
REGULARISERS = dict(label_smoothing=0.1, mixup=0.2, ema=0.99, dropout=0.2)  # row B of docs/small_data.md


def arms(recipe: TrainConfig, epochs: int) -> dict[str, TrainConfig]:
    """The three configurations measured (see the module docstring)."""
    common = dict(epochs=epochs, keep_checkpoints=1, patience=None)
    shared = {k: getattr(recipe, k) for k in SHARED}
    return {
        "defaults": TrainConfig(weights="none", freeze="partial", **shared, **common),
        "recipe": TrainConfig(**{**recipe.to_dict(), **common}),
        "recipe+regularisers": TrainConfig(**{**recipe.to_dict(), **common, **REGULARISERS}),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=ROOT / "configs" / "nih-small.yaml", help="a config file whose train: section is the recipe")
    p.add_argument("--run", type=Path, help="a run directory with shards/ (default: synthetic shards)")
    p.add_argument("--images", type=int, default=768, help="synthetic training images")
    p.add_argument("--image-size", type=int, default=64, help="synthetic image side (the recipe's preprocess size)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "recipe_speed.json")
    args = p.parse_args(argv)
    recipe = load_config(args.recipe).train.config
    configs = arms(recipe, args.epochs)
    rows: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or write_run(Path(tmp) / "run", n_train=args.images, n_val=max(32, args.images // 8), n_test=8,
                                    image_size=args.image_size, files=8)
        with ray_session():
            for _ in range(args.repeats):
                for name, cfg in configs.items():
                    rows[name].append(measure(run, cfg, str(Path(tmp) / "ray"), warmup=1))
    best = {name: median_run(r) for name, r in rows.items()}
    ratios = {name: round(row["images_per_s"] / best["defaults"]["images_per_s"], 3) for name, row in best.items()}
    differs = {k: v for k, v in configs["recipe"].to_dict().items() if v != configs["defaults"].to_dict()[k]}
    report = {"benchmark": "recipe_speed", "recipe": str(args.recipe), "differs_from_defaults": differs,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "arms": best, "ratio_to_defaults": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"recipe settings that differ from the defaults: {differs}")
    for name, row in best.items():
        print(f"{name:<20} {row['images_per_s']:>8.1f} img/s (steady {row['steady_images_per_s']:.1f}; repeats "
              f"{row['repeats_images_per_s']})  x{ratios[name]:.2f} the defaults")
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
