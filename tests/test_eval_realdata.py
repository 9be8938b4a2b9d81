"""Evaluation plumbing on the real NIH subset (skipped when ../shared/data/nih is absent).

The checkpoint here has random weights: this checks what real data changes (14 findings with real
prevalences, many images per patient, NIH's boxes in 1024-pixel units on 512-pixel files), not how
good a model is. A trained model's figures come from ``cxr train`` + ``cxr evaluate``.
"""
from __future__ import annotations

import json

import pytest
import torch

from evaluation import evaluate_run, explain_run
from pipelines.labels import FINDINGS
from tests.conftest import NIH_CSV, NIH_IMAGES
from tests.test_eval_fixtures import write_run
from trainers.checkpoint import model_info, save_checkpoint
from trainers.models import build_model

pytestmark = pytest.mark.realdata
SIZE = 64


@pytest.fixture(scope="module")
def nih_run(tmp_path_factory):
    if not NIH_CSV.exists() or not NIH_IMAGES.is_dir():
        pytest.skip(f"real NIH data not found at {NIH_IMAGES.parent}")
    run = write_run(tmp_path_factory.mktemp("nih") / "run", NIH_CSV, NIH_IMAGES, SIZE, 0.2, 0.15, 5)
    torch.manual_seed(0)
    stats = json.loads(run.stats.read_text())
    save_checkpoint(run.train / "best", build_model("resnet18"),
                    model_info({"backbone": "resnet18"}, SIZE, stats["mean"], stats["std"], 0, {}))
    return run


def test_nih_per_finding_auroc_with_patient_intervals(nih_run):
    result = evaluate_run(nih_run, n_boot=200, robustness=False)
    per = result.metrics["per_finding"]
    assert list(per) == list(FINDINGS)
    assert result.metrics["n_patients"] < result.metrics["n_images"]  # several images per patient
    for name in ("Pneumonia", "Infiltration", "Atelectasis", "Effusion"):
        m = per[name]
        assert m["n_positive"] > 0 and m["ci_low"] <= m["auroc"] <= m["ci_high"], (name, m)
    assert result.metrics["view_shift"]["PA"]["n_images"] > 0 and result.metrics["view_shift"]["AP"]["n_images"] > 0


def test_nih_pointing_game_uses_the_1024_pixel_box_frame(nih_run):
    if not nih_run.eval_metrics.exists():
        evaluate_run(nih_run, n_boot=50, robustness=False)
    result = explain_run(nih_run, max_images=3)
    assert result.summary["n"] > 0 and result.summary["box_file"].endswith("BBox_List_2017.csv.gz")
    boxes = result.pointing
    # NIH boxes are in 1024 units; read as 512-pixel file units they would reach past the model's frame
    assert boxes[["x0", "y0", "x1", "y1"]].to_numpy().max() <= SIZE + 1e-6
    assert 0 <= result.summary["baseline"] < 1 and 0 <= result.summary["hit_rate"] <= 1
