"""The training benchmarks' CPU path, so the scripts do not rot: benchmarks/gpu_train.py --cpu runs
benchmarks/train_ingest.py (Ray Data feed vs in-memory feed) with DenseNet121 at tiny settings."""
from __future__ import annotations

import json

import pytest

from benchmarks.gpu_train import main
from trainers.config import TrainConfig

pytestmark = pytest.mark.ray


def test_gpu_benchmark_cpu_path_measures_both_feeds(tmp_path):
    out = tmp_path / "gpu_train.json"
    report = main(["--cpu", "--images", "32", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["benchmark"] == "gpu_train" and stored["device"] == "cpu"
    assert stored["settings"]["backbone"] == "densenet121"
    for feed in ("ray_data", "memory"):
        assert report[feed]["images_per_s"] > 0 and report[feed]["train_images_per_epoch"] == 32
    assert stored["ratio"] > 0


def test_recipe_benchmark_compares_the_recipe_with_the_defaults_on_the_same_footing():
    """benchmarks/recipe_speed.py: the arms share batch, workers and CPUs; the defaults arm is
    TrainConfig's own (DenseNet121, partial freeze), the regularised arm adds exactly the regularisers
    (checked without training: the script's timing runs are for the docs)."""
    from benchmarks.recipe_speed import REGULARISERS, SHARED, arms

    recipe = TrainConfig(backbone="resnet18", weights="none", batch_size=16, workers=1, epochs=30, patience=5)
    both = arms(recipe, epochs=3)
    defaults, measured, regularised = (both[k].to_dict() for k in ("defaults", "recipe", "recipe+regularisers"))
    assert all(defaults[k] == measured[k] == regularised[k] for k in SHARED)
    assert defaults["epochs"] == measured["epochs"] == 3 and measured["patience"] is None
    assert defaults["backbone"] == TrainConfig().backbone and defaults["freeze"] == "partial" and measured["backbone"] == "resnet18"
    assert {k for k in regularised if regularised[k] != measured[k]} == set(REGULARISERS)
