"""The training benchmarks' CPU path, so the scripts do not rot: benchmarks/gpu_train.py --cpu runs
benchmarks/train_ingest.py (Ray Data feed vs in-memory feed) with DenseNet121 at tiny settings."""
from __future__ import annotations

import json

import pytest

from benchmarks.gpu_train import main

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
