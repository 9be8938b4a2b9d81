"""Evaluation figures against scikit-learn and hand-computed cases (no model, no Ray: fast)."""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation.bootstrap import bootstrap_auroc, mean_replicates, patient_weights, percentile_interval
from evaluation.calibration import expected_calibration_error, reliability_table
from evaluation.metrics import auroc, average_precision, prevalence, weighted_auroc
from evaluation.operating_points import choose_threshold, operating_metrics
from evaluation.pointing import box_to_model, chance, expand, peak, play, summarize
from evaluation.robustness import PERTURBATIONS, perturb, robustness_table
from evaluation.subgroups import age_band, below_overall, column_values, subgroup_columns, subgroup_table
from tests.helpers import chest_like


# --------------------------------------------------------------------------- AUROC and AP


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auroc_by_hand():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4), (0.8>0.1), (0.4=0.4: half), (0.4>0.1) -> 3.5/4
    assert auroc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == 0.875


def test_ap_by_hand():
    # ranked 0.9(+), 0.8(-), 0.7(+): recall steps 1/2 at precision 1, 1/2 at precision 2/3
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_undefined_finding_is_nan_not_half():
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(auroc([1, 1], [0.1, 0.5]))
    assert math.isnan(average_precision([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(auroc([], []))


def test_uncertain_labels_are_left_out():
    y = np.array([1, 0, -1, -1])
    s = np.array([0.9, 0.1, 0.0, 1.0])
    assert auroc(y, s) == 1.0
    assert prevalence(y) == 0.5


def test_weighted_auroc_equals_repeating_images():
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 30), np.round(rng.random(30), 1)
    w = rng.integers(0, 4, 30)
    repeated = roc_auc_score(np.repeat(y, w), np.repeat(s, w))
    assert weighted_auroc(y, s, w[None, :])[0] == pytest.approx(repeated, abs=1e-12)


# --------------------------------------------------------------------------- bootstrap by patient


def test_patient_weights_draw_whole_patients():
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    weights = patient_weights(patients, 200, np.random.default_rng(0))
    assert weights.shape == (200, 6)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 1] == weights[:, 2]).all()
    assert (weights[:, 4] == weights[:, 5]).all()
    per_patient = weights[:, [0, 3, 4]]
    assert (per_patient.sum(axis=1) == 3).all()  # three patients drawn per replicate


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_correlated_images():
    """Ten images per patient with near-identical scores: resampling images pretends there are ten
    times as many independent cases, so its interval is too narrow."""
    rng = np.random.default_rng(0)
    n_patients, per = 30, 10
    patient_label = rng.integers(0, 2, n_patients)
    patient_score = rng.normal(0.6 * patient_label, 1.0)
    y = np.repeat(patient_label, per)[:, None]
    s = (np.repeat(patient_score, per) + rng.normal(0, 0.01, n_patients * per))[:, None]
    by_patient = percentile_interval(bootstrap_auroc(y, s, np.repeat(np.arange(n_patients), per), 1000, seed=1)[:, 0])
    by_image = percentile_interval(bootstrap_auroc(y, s, np.arange(n_patients * per), 1000, seed=1)[:, 0])
    point = auroc(y[:, 0], s[:, 0])
    assert by_patient.low <= point <= by_patient.high
    assert (by_patient.high - by_patient.low) > 2 * (by_image.high - by_image.low)


def test_bootstrap_skips_single_class_replicates_and_counts_valid():
    y = np.array([[1], [0], [0], [0]])
    s = np.array([[0.9], [0.2], [0.3], [0.1]])
    reps = bootstrap_auroc(y, s, np.array(["p1", "p2", "p3", "p4"]), 500, seed=0)
    interval = percentile_interval(reps[:, 0])
    # the only positive's patient is missing in about (3/4)^4 = 32% of replicates
    assert 0 < interval.n_valid < 500
    assert np.isnan(reps[:, 0]).sum() == 500 - interval.n_valid
    assert interval.low == interval.high == 1.0


def test_mean_replicates_need_every_finding():
    reps = np.array([[0.8, 0.6, np.nan], [0.7, np.nan, 0.5]])
    assert mean_replicates(reps, [0, 1])[0] == pytest.approx(0.7)
    assert np.isnan(mean_replicates(reps, [0, 1])[1])


def test_bootstrap_is_fast_enough():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 14)) < 0.2).astype(np.int8)
    s = rng.random((300, 14))
    start = time.perf_counter()
    bootstrap_auroc(y, s, np.repeat(np.arange(150), 2), 1000, seed=0)
    assert time.perf_counter() - start < 10  # ~1 s on an idle 2-core machine


# --------------------------------------------------------------------------- operating points


def test_operating_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.7, 0.2, 0.8, 0.3, 0.2, 0.1, 0.0])
    m = operating_metrics(y, s, 0.5)  # called: 0.9(+), 0.7(+), 0.8(-)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 4, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_rates_with_zero_denominator_are_none():
    m = operating_metrics(np.array([1, 0]), np.array([0.1, 0.2]), 0.9)  # nothing called positive
    assert m["ppv"] is None and m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    assert operating_metrics([1, 0], [0.1, 0.2], None)["sensitivity"] is None


def test_youden_threshold_maximises_j():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    t = choose_threshold(y, s, "youden")
    m = operating_metrics(y, s, t)
    best = max(operating_metrics(y, s, c)["sensitivity"] + operating_metrics(y, s, c)["specificity"] for c in s)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)
    assert t == 0.6


def test_target_sensitivity_threshold():
    y = np.array([0, 0, 1, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.9])
    t = choose_threshold(y, s, "sensitivity", target_sensitivity=0.8)
    assert t == 0.5  # the highest threshold catching 4 of 5
    assert operating_metrics(y, s, t)["sensitivity"] == pytest.approx(0.8)


def test_threshold_undefined_with_one_class():
    assert choose_threshold(np.zeros(5), np.linspace(0, 1, 5)) is None
    with pytest.raises(ValueError, match="youden"):
        choose_threshold([0, 1], [0.1, 0.2], "best")


# --------------------------------------------------------------------------- calibration


def test_ece_by_hand():
    # bin [0.1,0.2): p 0.1, 0.1 with outcomes 0, 1 -> observed 0.5, gap 0.4, weight 2/4
    # bin [0.9,1.0]: p 0.9, 1.0 with outcomes 1, 1 -> observed 1.0, mean 0.95, gap 0.05, weight 2/4
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 1.0])
    table = reliability_table(y, p)
    assert table["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)


def test_ece_of_perfect_calibration_is_zero_and_undefined_without_labels():
    y = np.array([0, 0, 0, 1] * 5)
    assert expected_calibration_error(y, np.full(20, 0.25)) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(np.array([-1, -1]), np.array([0.2, 0.3])))


# --------------------------------------------------------------------------- pointing game


def test_pointing_by_hand():
    heatmap = np.zeros((10, 10))
    heatmap[6, 3] = 1.0  # peak at x=3.5, y=6.5 (pixel centre)
    assert peak(heatmap) == (3.5, 6.5)
    hit = play(heatmap, (2.0, 5.0, 5.0, 8.0), tolerance=0.0)
    assert hit["hit"] and hit["baseline"] == pytest.approx(9 / 100)
    miss = play(heatmap, (5.0, 5.0, 8.0, 8.0), tolerance=0.0)
    assert not miss["hit"]
    near = play(heatmap, (4.0, 5.0, 8.0, 8.0), tolerance=0.1)  # 1-pixel margin reaches x=3.5
    assert not near["hit"] and near["hit_tolerant"]
    assert near["baseline_tolerant"] == pytest.approx(6 * 5 / 100)


def test_box_scaling_and_clipping():
    # an NIH box in the 1024 frame on a 224 model input
    assert box_to_model(512, 256, 128, 64, 1024, 1024, 224) == pytest.approx((112, 56, 140, 70))
    assert chance(expand((0, 0, 2, 2), 1.0), 10) == pytest.approx(9 / 100)  # clipped at the image edge


def test_pointing_summary():
    rows = pd.DataFrame({"finding": ["A", "A", "B"], "hit": [True, False, True], "baseline": [0.1, 0.3, 0.2],
                         "hit_tolerant": [True, True, True], "baseline_tolerant": [0.2, 0.4, 0.3]})
    s = summarize(rows)
    assert (s["n"], s["hits"]) == (3, 2)
    assert s["hit_rate"] == pytest.approx(2 / 3) and s["baseline"] == pytest.approx(0.2)
    assert s["per_finding"]["A"]["hit_rate"] == 0.5 and s["per_finding"]["B"]["n"] == 1


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("spec", PERTURBATIONS, ids=lambda p: p.name)
def test_perturbations_grow_with_strength(spec):
    images = np.stack([chest_like(64, seed) for seed in range(3)])
    assert perturb(images, spec.name, 0) is images
    change = [np.abs(perturb(images, spec.name, level).astype(float) - images).mean()
              for level in range(1, len(spec.strengths) + 1)]
    assert change[0] > 0
    assert all(b > a for a, b in zip(change, change[1:])), change
    out = perturb(images, spec.name, len(spec.strengths))
    assert out.dtype == np.uint8 and out.shape == images.shape


def test_robustness_table_shape_and_clean_row():
    rng = np.random.default_rng(0)
    images = np.stack([chest_like(32, s) for s in range(20)])
    labels = rng.integers(0, 2, (20, 2)).astype(np.int8)
    labels[:, 1] = 0  # an undefined finding stays out of the mean

    def predict(x: np.ndarray) -> np.ndarray:  # brighter images score higher for finding 0
        return np.stack([x.mean(axis=(1, 2)) / 255, np.full(len(x), 0.5)], axis=1)

    table = robustness_table(predict, images, labels, ["A", "B"])
    assert len(table) == sum(len(p.strengths) + 1 for p in PERTURBATIONS)
    clean = table[table["level"] == 0]
    assert (clean["mean_auroc"] == clean["auroc_A"]).all()
    assert table["auroc_B"].isna().all()
    assert set(table.loc[(table.perturbation == "jpeg") & (table.level == 0), "strength"]) == {100.0}


# --------------------------------------------------------------------------- subgroups


def test_age_bands():
    bands = age_band(pd.Series([5, 39, 40, 59, 60, 95, None]))
    assert bands.tolist()[:6] == ["<40", "<40", "40-59", "40-59", "60+", "60+"]
    assert pd.isna(bands.iloc[6])


def test_subgroup_table_gap_and_intervals():
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(n)], "sex": ["F", "M"] * (n // 2),
                          "age": rng.integers(20, 90, n), "view": rng.choice(["PA", "AP"], n)})
    y = rng.integers(0, 2, n)
    frame["A"] = y
    frame["prob_A"] = np.where(frame["sex"] == "F", y * 0.8 + rng.random(n) * 0.2, rng.random(n))  # perfect on F
    overall = auroc(y, frame["prob_A"].to_numpy())
    table = subgroup_table(frame, ["A"], n_boot=200)
    female = table[(table.attribute == "sex") & (table.group == "F") & (table.finding == "A")].iloc[0]
    assert female["auroc"] == 1.0 and female["gap"] == pytest.approx(1.0 - overall)
    assert female["gap_ci_low"] > 0, "paired interval of the gap: F is better than all, beyond chance"
    assert set(table["attribute"]) == {"sex", "age_band", "view"}
    means = table[table.finding == "mean"]
    assert len(means) == len(means[["attribute", "group"]].drop_duplicates())
    assert ((means["ci_low"] <= means["auroc"] + 1e-12) & (means["auroc"] <= means["ci_high"] + 1e-12)).all()
    for r in table.itertuples():  # every group's AUROC is scikit-learn's on the same rows
        rows = (column_values(frame, r.attribute) == r.group).fillna(False).to_numpy(bool)
        if r.finding == "A":
            assert r.auroc == pytest.approx(roc_auc_score(frame.loc[rows, "A"], frame.loc[rows, "prob_A"]), abs=1e-9)


def test_subgroups_by_any_column_and_their_errors():
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(60)], "site": ["a", "b", "c"] * 20,
                          "image_id": [f"i{i}" for i in range(60)], "A": [0, 1] * 30, "prob_A": np.linspace(0, 1, 60)})
    table = subgroup_table(frame, ["A"], ["site"], n_boot=50)
    assert set(table["group"]) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="no column 'hospital'"):
        subgroup_columns(frame, ["hospital"])
    with pytest.raises(ValueError, match="'image_id' has 60 distinct values"):
        subgroup_columns(frame, ["image_id"])


def test_a_cohort_where_the_model_is_random_is_named():
    """Good on cohort A, random on cohort B: B's interval lies below the overall figure."""
    rng = np.random.default_rng(1)
    n = 400
    cohort = np.where(np.arange(n) < 300, "A", "B")
    y = rng.integers(0, 2, n)
    prob = np.where(cohort == "A", 0.7 * y + 0.3 * rng.random(n), rng.random(n))
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "cohort": cohort, "A": y, "prob_A": prob})
    table = subgroup_table(frame, ["A"], n_boot=300)
    overall = auroc(y, prob)
    lines = below_overall(table, overall)
    assert len(lines) == 1 and lines[0].startswith("On cohort B (100 images")
    assert "well below" in lines[0]


def test_the_summary_and_the_report_name_the_failing_cohort(tmp_path):
    """Good on cohort A, random on cohort B; a metadata baseline the model beats overall but not on B."""
    from evaluation.baselines import Baseline, compare
    from evaluation.evaluate import failure_lines
    from evaluation.report import _glance
    from pipelines.rundir import RunDir

    rng = np.random.default_rng(2)
    n = 400
    cohort = np.where(np.arange(n) < 300, "A", "B")
    y = rng.integers(0, 2, n)
    prob = np.where(cohort == "A", 0.7 * y + 0.3 * rng.random(n), rng.random(n))
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "cohort": cohort, "A": y, "prob_A": prob})
    meta = Baseline("metadata", np.where(cohort == "B", 0.3 * y + 0.7 * rng.random(n), rng.random(n))[:, None], ["sex"])
    groups = subgroup_table(frame, ["A"], baselines={"metadata": meta.probs}, n_boot=300)
    comparison = compare(y[:, None], prob[:, None], frame["patient_id"].to_numpy(), ["A"], meta, n_boot=300)
    overall = auroc(y, prob)
    lines = failure_lines({"auroc": overall}, {"metadata": comparison}, groups)
    assert any(line.startswith("On cohort B (100 images") and "well below" in line for line in lines)
    assert any(line.startswith("On cohort B (100 images) the model is not shown to beat a metadata-only baseline") for line in lines)
    assert not any("cohort A" in line for line in lines)
    page = _glance({"mean": {"auroc": overall, "ci_low": 0.7, "ci_high": 0.8, "findings": ["A"]}, "n_images": n, "n_patients": n,
                    "backbone": "resnet18", "image_size": 64, "warnings": lines}, RunDir(tmp_path))
    assert "Where the model fails" in page and "On cohort B (100 images" in page
