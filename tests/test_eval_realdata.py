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


def test_nih_trained_model_keeps_held_out_nih_in_distribution_and_scores_phantoms_higher(nih_run, tmp_path):
    """The reverse of tests/test_score.py's check: a model trained on real radiographs keeps held-out
    NIH images in distribution and scores synthetic phantoms as further out (it flags only some)."""
    import shutil

    import numpy as np
    import pandas as pd

    from evaluation.predict import decode_images
    from evaluation.scoring import Scorer
    from pipelines.phantoms import make_collection
    from pipelines.rundir import RunDir
    from tests.test_eval_fixtures import train_tiny
    from trainers.ood import record_ood

    run = RunDir(tmp_path / "run")
    shutil.copytree(nih_run.root / "shards", run.shards)
    shutil.copy(nih_run.stats, run.stats)
    train_tiny(run, epochs=2)  # a briefly trained model: its features, not random ones
    record_ood(run.train_best, run)
    scorer = Scorer(run.train_best)

    manifest = pd.read_parquet(nih_run.manifest).merge(pd.read_parquet(nih_run.splits)[["image_id", "split"]], on="image_id")
    held_out = [NIH_IMAGES / p for p in manifest.loc[manifest["split"] == "test", "path"]][:60]  # neither fit nor threshold saw these
    phantoms = sorted(make_collection(tmp_path / "phantoms", n_patients=12, image_size=SIZE, seed=5).images.glob("*.png"))[:24]
    nih_scores = scorer.score(decode_images(held_out, SIZE))
    phantom_scores = scorer.score(decode_images(phantoms, SIZE))
    # Measured (2 epochs at 64 px): held-out NIH 0% flagged, median ood_score 0.50; phantoms 33% flagged,
    # median 0.95. Chest-like phantoms sit inside the wide spread of real radiographs (AP and PA, every
    # exposure): the flag catches what is far from NIH, not everything that is synthetic (README, cxr score).
    assert nih_scores["ood"].mean() <= 0.1, np.sort(nih_scores["ood_score"])
    assert phantom_scores["ood"].mean() > nih_scores["ood"].mean()
    assert np.median(phantom_scores["ood_score"]) > 1.5 * np.median(nih_scores["ood_score"])
