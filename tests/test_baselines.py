"""Baselines beside the model: checked against scikit-learn, and the 'not shown to beat' flag can
fail both ways."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from evaluation.baselines import METADATA, Baseline, compare, fit_baselines, not_shown_to_beat, thumbnails, verdict

FINDINGS = ["Effusion", "Mass"]


def _cohort(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Patients whose Effusion depends on sex and view (metadata knows it); Mass is pure noise."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "patient_id": [f"p{seed}_{i}" for i in range(n)],
        "age": rng.integers(20, 90, n),
        "sex": rng.choice(["M", "F"], n),
        "view": rng.choice(["PA", "AP"], n),
    })
    p = 0.15 + 0.6 * ((frame["view"] == "AP") & (frame["sex"] == "M"))
    labels = np.stack([rng.random(n) < p, rng.random(n) < 0.3], axis=1).astype(np.int8)
    return frame, labels


def test_metadata_baseline_auroc_is_scikit_learns():
    train, y_train = _cohort(400, 1)
    test, y_test = _cohort(300, 2)
    (meta,) = fit_baselines(train, y_train, None, test, None)
    assert meta.name == METADATA and meta.features == ["age", "sex", "view"]
    result = compare(y_test, np.random.default_rng(0).random((300, 2)), test["patient_id"].to_numpy(), FINDINGS, meta, n_boot=200)
    for j, name in enumerate(FINDINGS):
        assert result["per_finding"][name]["auroc"] == pytest.approx(roc_auc_score(y_test[:, j], meta.probs[:, j]), abs=1e-9)
    assert result["per_finding"]["Effusion"]["auroc"] > 0.7  # metadata does know Effusion here


def test_a_model_that_is_the_metadata_baseline_plus_noise_is_flagged():
    train, y_train = _cohort(400, 1)
    test, y_test = _cohort(300, 2)
    (meta,) = fit_baselines(train, y_train, None, test, None)
    model = np.clip(meta.probs + np.random.default_rng(3).normal(0, 0.02, meta.probs.shape), 0, 1)
    result = compare(y_test, model, test["patient_id"].to_numpy(), FINDINGS, meta, n_boot=300)
    assert not_shown_to_beat(result)
    assert verdict(METADATA, result).startswith("not shown to beat a metadata-only baseline")


def test_a_model_that_truly_is_better_is_not_flagged():
    train, y_train = _cohort(400, 1)
    test, y_test = _cohort(300, 2)
    (meta,) = fit_baselines(train, y_train, None, test, None)
    rng = np.random.default_rng(4)
    model = np.clip(y_test + rng.normal(0, 0.35, y_test.shape), 0, None)  # sees the finding itself
    result = compare(y_test, model, test["patient_id"].to_numpy(), FINDINGS, meta, n_boot=300)
    assert result["diff_ci_low"] > 0 and not not_shown_to_beat(result)
    assert verdict(METADATA, result) is None


def test_the_comparison_is_paired():
    """The same scores on both sides give a difference of exactly 0 in every replicate."""
    test, y_test = _cohort(200, 5)
    probs = np.random.default_rng(6).random((200, 2))
    result = compare(y_test, probs, test["patient_id"].to_numpy(), FINDINGS, Baseline("same", probs, []), n_boot=100)
    assert result["diff"] == 0 and result["diff_ci_low"] == 0 and result["diff_ci_high"] == 0


def test_image_statistics_baseline_uses_thumbnails():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (50, 64, 64), dtype=np.uint8)
    small = thumbnails(images)
    assert small.shape == (50, 32 * 32)
    assert small[0, 0] == pytest.approx(images[0, :2, :2].mean() / 255.0)
    train, y_train = _cohort(50, 8)
    bright = (y_train[:, 0] * 120 + rng.integers(0, 100, 50)).astype(np.uint8)
    train_images = np.broadcast_to(bright[:, None, None], (50, 64, 64)).copy()
    baselines = fit_baselines(train, y_train, thumbnails(train_images), train, thumbnails(train_images))
    assert [b.name for b in baselines] == ["metadata", "image_statistics"]
    assert roc_auc_score(y_train[:, 0], baselines[1].probs[:, 0]) > 0.9  # brightness carries the label here


def test_a_finding_with_one_class_in_train_is_not_fitted():
    train, y_train = _cohort(100, 9)
    y_train[:, 1] = 0
    test, _ = _cohort(50, 10)
    (meta,) = fit_baselines(train, y_train, None, test, None)
    assert np.isnan(meta.probs[:, 1]).all() and not np.isnan(meta.probs[:, 0]).any()
