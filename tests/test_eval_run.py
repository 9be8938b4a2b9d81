"""evaluate_run, explain, explain_run and predict_images on a phantom run with a briefly trained
ResNet18 (built once per session by tests.test_eval_fixtures), and predict on a real NIH PNG."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation import explain, format_predictions, predict_images
from evaluation.explanations import box_frame_for, gallery_items
from evaluation.operating_points import choose_threshold
from evaluation.pointing import NIH_BOX_FRAME
from pipelines.imaging import DecodeError
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from pipelines.sources.nih import read_boxes
from tests.conftest import NIH_CSV, NIH_IMAGES
from tests.test_eval_fixtures import evaluated_run, phantom_run  # session fixtures


def test_predictions_table_follows_the_contract(evaluated_run):
    out = evaluated_run.evaluation.out_dir
    frame = pd.read_parquet(out / "predictions.parquet")
    expected = ["image_id", "patient_id", *FINDINGS, *[f"prob_{f}" for f in FINDINGS]]
    assert list(frame.columns[: len(expected)]) == expected
    splits = pd.read_parquet(evaluated_run.phantom.run.splits)
    assert set(frame["image_id"]) == set(splits.loc[splits["split"] == "test", "image_id"])
    probs = frame[[f"prob_{f}" for f in FINDINGS]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    for name in ("predictions.parquet", "val_predictions.parquet", "metrics.json", "robustness.csv", "subgroups.csv",
                 "figures/roc.png", "figures/pr.png", "figures/calibration.png", "figures/robustness.png",
                 "figures/subgroups.png"):
        assert (out / name).is_file(), name


def test_metrics_json_matches_sklearn_and_validation_thresholds(evaluated_run):
    out = evaluated_run.evaluation.out_dir
    metrics = json.loads((out / "metrics.json").read_text())
    test = pd.read_parquet(out / "predictions.parquet")
    val = pd.read_parquet(out / "val_predictions.parquet")
    per = metrics["per_finding"]
    assert list(per) == list(FINDINGS)
    defined = []
    for name, m in per.items():
        for key in ("auroc", "ci_low", "ci_high", "ap", "prevalence", "threshold", "sensitivity", "specificity",
                    "ppv", "npv", "f1", "tp", "fp", "tn", "fn", "ece"):
            assert key in m
        y, p = test[name].to_numpy(), test[f"prob_{name}"].to_numpy()
        if len(np.unique(y)) < 2:
            assert m["auroc"] is None and m["ci_low"] is None and m["note"]  # undefined, never 0.5
            continue
        defined.append(name)
        assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
        assert m["ap"] == pytest.approx(average_precision_score(y, p))
        assert m["prevalence"] == pytest.approx(y.mean())
        assert m["ci_low"] <= m["auroc"] <= m["ci_high"]
        assert m["threshold"] == choose_threshold(val[name].to_numpy(), val[f"prob_{name}"].to_numpy())
        called = p >= m["threshold"]
        assert m["tp"] == int((called & (y == 1)).sum()) and m["fn"] == int((~called & (y == 1)).sum())
        assert m["sensitivity"] == pytest.approx(m["tp"] / (m["tp"] + m["fn"]))
    assert "Atelectasis" not in defined  # phantoms never plant it
    assert metrics["mean"]["findings"] == defined
    assert metrics["mean"]["auroc"] == pytest.approx(np.mean([per[f]["auroc"] for f in defined]))
    assert metrics["mean_auroc"] == metrics["mean"]["auroc"]
    assert metrics["mean"]["ci_low"] <= metrics["mean"]["auroc"] <= metrics["mean"]["ci_high"]
    assert metrics["bootstrap"]["unit"] == "patient"
    assert {"PA", "AP", "note"} <= set(metrics["view_shift"])


def test_model_learned_the_phantoms(evaluated_run):
    per = evaluated_run.evaluation.metrics["per_finding"]
    assert per["Cardiomegaly"]["auroc"] > 0.85  # the heart's size is the easiest planted finding


def test_evaluate_reports_each_phase_and_each_robustness_level(evaluated_run):
    """A large test split takes tens of minutes: the user sees a line per phase and per perturbed level."""
    from evaluation.robustness import PERTURBATIONS

    lines = evaluated_run.progress
    levels = [line for line in lines if line.startswith("robustness ")]
    assert len(levels) == sum(len(p.strengths) for p in PERTURBATIONS) == len(evaluated_run.evaluation.robustness.query("level > 0"))
    assert levels[-1].startswith(f"robustness {len(levels)}/{len(levels)}: ")
    for phase in ("scored ", "baselines fit", "per-finding metrics", "subgroups: "):
        assert sum(line.startswith(phase) for line in lines) == 1, (phase, lines)
    assert len(lines) == len(levels) + 4


def test_robustness_and_subgroup_tables(evaluated_run):
    robust, groups = evaluated_run.evaluation.robustness, evaluated_run.evaluation.subgroups
    assert set(robust["perturbation"]) == {"noise", "contrast", "brightness", "blur", "rotation", "jpeg", "downscale"}
    clean = robust.loc[robust["level"] == 0, "mean_auroc"]
    assert np.allclose(clean, evaluated_run.evaluation.metrics["mean"]["auroc"])
    strongest = robust[robust["level"] == robust["level"].max()].set_index("perturbation")["mean_auroc"]
    assert strongest["noise"] < clean.iloc[0]  # sigma 32 grey levels hurts
    assert {"sex", "age_band", "view"} <= set(groups["attribute"])
    assert {"auroc", "ci_low", "ci_high", "gap", "gap_ci_low", "gap_ci_high", "n_images", "n_patients",
            "baseline_metadata", "vs_metadata", "vs_metadata_ci_low", "vs_metadata_ci_high"} <= set(groups.columns)


def test_baselines_and_subgroups_in_metrics_json(evaluated_run):
    """Both baselines are fit on train and compared on the same replicates; subgroups carry paired gaps."""
    metrics = evaluated_run.evaluation.metrics
    assert set(metrics["baselines"]) == {"metadata", "image_statistics"}
    test = pd.read_parquet(evaluated_run.evaluation.out_dir / "predictions.parquet")
    for name, b in metrics["baselines"].items():
        assert {"mean_auroc", "ci_low", "ci_high", "per_finding", "diff", "diff_ci_low", "diff_ci_high"} <= set(b)
        assert b["diff"] == pytest.approx(metrics["mean"]["auroc"] - b["mean_auroc"])
    sex = metrics["subgroups"]["sex"]
    for value, entry in sex.items():
        assert {"mean_auroc", "ci_low", "ci_high", "gap", "gap_ci_low", "gap_ci_high", "n_images", "n_patients", "per_finding"} <= set(entry)
        rows = test["sex"] == value
        assert entry["n_images"] == int(rows.sum())
        card = entry["per_finding"]["Cardiomegaly"]
        if card["auroc"] is not None:
            assert card["auroc"] == pytest.approx(roc_auc_score(test.loc[rows, "Cardiomegaly"], test.loc[rows, "prob_Cardiomegaly"]), abs=1e-9)
    assert isinstance(metrics["warnings"], list)


def test_gradcam_beats_random_point_on_phantoms(evaluated_run):
    summary = evaluated_run.explanation.summary
    assert summary["n"] >= 20
    assert summary["hit_rate"] >= 2 * summary["baseline"] and summary["hit_rate"] - summary["baseline"] >= 0.15, summary
    pointing = evaluated_run.explanation.pointing
    assert set(pointing["finding"]) <= {"Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax"}
    out = evaluated_run.explanation.out_dir
    assert (out / "pointing.json").is_file() and (out / "pointing.png").is_file()


def test_gallery_has_true_and_false_cases(evaluated_run):
    gallery = evaluated_run.explanation.gallery
    out = evaluated_run.explanation.out_dir
    assert len(gallery) >= 3 and "TP" in set(gallery["category"])
    for row in gallery.itertuples():
        assert (out / row.png).is_file()
        if row.category == "FN":
            assert row.prob < row.threshold
        else:
            assert row.prob >= row.threshold


def test_explain_on_files_without_a_run(phantom_run, tmp_path):
    boxes = read_boxes(phantom_run.boxes_csv)
    files = [phantom_run.images / name for name in sorted(set(boxes["image_id"]))[:3]]
    result = explain(phantom_run.checkpoint, files, tmp_path, boxes=boxes)
    assert [p.name for p in result.images] == [f.stem + ".png" for f in files]
    assert all(p.stat().st_size > 0 for p in result.images)
    assert len(result.pointing) == len(boxes[boxes["image_id"].isin([f.name for f in files])])
    assert (tmp_path / "pointing.csv").is_file()
    assert "pointing game" in result.format()


def test_predict_images_matches_evaluation(evaluated_run):
    test = pd.read_parquet(evaluated_run.evaluation.out_dir / "predictions.parquet").head(3)
    files = [evaluated_run.phantom.images / i for i in test["image_id"]]
    frame = predict_images(evaluated_run.phantom.checkpoint, files)
    assert list(frame.columns) == ["image", *[f"prob_{f}" for f in FINDINGS], "ood_score", "ood", "ood_intensity", "ood_features"]
    assert frame["ood"].isna().all() and "no ood.npz" in frame.attrs["ood_note"]  # this fixture records no OOD statistics
    # the same decode as preprocessing: the same pixels, so the same probabilities
    np.testing.assert_allclose(frame[[f"prob_{f}" for f in FINDINGS]].to_numpy(),
                               test[[f"prob_{f}" for f in FINDINGS]].to_numpy(), atol=1e-5)


def test_predict_names_an_undecodable_file(phantom_run, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(DecodeError, match="broken.png"):
        predict_images(phantom_run.checkpoint, [bad])


def test_checkpoint_resolution(phantom_run, tmp_path):
    assert phantom_run.run.best_checkpoint() == phantom_run.run.train_best
    with pytest.raises(FileNotFoundError, match="cxr train"):
        RunDir(tmp_path).best_checkpoint()


def test_box_frame_and_gallery_selection():
    boxes = pd.DataFrame({"x": [700.0], "y": [100.0], "w": [200.0], "h": [100.0]})
    assert box_frame_for(boxes, [512, 512]) == NIH_BOX_FRAME  # NIH boxes on downsampled files
    assert box_frame_for(boxes, [512, 1024]) == NIH_BOX_FRAME
    assert box_frame_for(boxes, [1024]) is None  # the file's own pixels
    predictions = pd.DataFrame({"image_id": list("abcd"), "A": [1, 1, 0, 0], "prob_A": [0.9, 0.2, 0.8, 0.1]})
    items = gallery_items(predictions, {"A": {"threshold": 0.5}, "B": {"threshold": None}}, max_images=6)
    assert dict(zip(items["category"], items["image_id"])) == {"TP": "a", "FP": "c", "FN": "b"}


@pytest.mark.realdata
def test_predict_real_nih_png(tmp_path):
    if not NIH_CSV.exists() or not NIH_IMAGES.is_dir():
        pytest.skip(f"real NIH data not found at {NIH_IMAGES.parent}")
    import torch

    from trainers.checkpoint import model_info, save_checkpoint
    from trainers.models import build_model

    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(checkpoint, build_model("resnet18"), model_info({"backbone": "resnet18"}, 64, 0.5, 0.25, 1, {}))
    png = sorted(NIH_IMAGES.glob("*.png"))[0]
    frame = predict_images(checkpoint, [png])
    probs = frame[[f"prob_{f}" for f in FINDINGS]].iloc[0]
    assert len(probs) == 14 and ((probs >= 0) & (probs <= 1)).all()
    text = format_predictions(frame)
    assert str(png) in text and all(f in text for f in FINDINGS)
    assert "out of distribution: unknown" in text and "no ood.npz" in text
