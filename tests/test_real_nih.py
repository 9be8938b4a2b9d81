"""The real NIH subset through the CLI, stage by stage: ingest, split, preprocess, then a short
training run, evaluation with patient-bootstrap intervals, Grad-CAM with the pointing game, and
`cxr predict` from the checkpoint alone."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.cli import main
from pipelines.shards import images_from_column, split_dir

pytestmark = [pytest.mark.realdata, pytest.mark.ray]
SIZE = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory, nih):
    run = tmp_path_factory.mktemp("nih_run")
    cohorts = ["--cohorts", str(nih / "collections.csv")] if (nih / "collections.csv").exists() else []
    assert main(["ingest", "--run", str(run), "--source", "nih", "--csv", str(nih / "Data_Entry_2017_v2020.csv.gz"), "--images", str(nih / "images"), *cohorts]) == 0
    return run


def test_ingest_keeps_present_images_and_quarantines_the_rest(run):
    manifest = pd.read_parquet(run / "manifest.parquet")
    quarantine = pd.read_parquet(run / "quarantine.parquet")
    assert len(manifest) == 1301 and manifest["image_id"].is_unique
    assert len(quarantine) == 110819 and set(quarantine["reason"]) == {"missing file"}
    assert manifest["patient_id"].nunique() == 977
    assert int(manifest["Pneumonia"].sum()) == 504 and int(manifest["Hernia"].sum()) == 12
    assert json.loads((run / "source.json").read_text())["rows_in"] == 112120


def test_split_is_patient_disjoint(run, capsys):
    assert main(["split", "--run", str(run), "--seed", "0"]) == 0
    assert "leakage audit: 0 patients shared between splits" in capsys.readouterr().out
    splits = pd.read_parquet(run / "splits.parquet")
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    report = json.loads((run / "split_report.json").read_text())
    assert report["patients_in_two_splits"] == 0
    assert all(report["positives"][f]["test"] >= 10 for f in ("Pneumothorax", "Emphysema", "Fibrosis"))


def test_preprocess_writes_every_image_converting_rgba(run):
    assert main(["preprocess", "--run", str(run), "--image-size", str(SIZE)]) == 0
    frames = [pd.read_parquet(split_dir(run / "shards", s), columns=["image_id", "image", "orig_mode"]) for s in ("train", "val", "test")]
    shards = pd.concat(frames)
    assert len(shards) == 1301 and shards["image_id"].is_unique
    assert (shards["orig_mode"] == "RGBA").sum() == 5
    assert images_from_column(shards["image"], SIZE).shape == (1301, SIZE, SIZE)
    stats = json.loads((run / "stats.json").read_text())
    assert stats["computed_on"] == "train" and 0.3 < stats["mean"] < 0.7


def test_short_training_run_reports_per_finding_validation_auroc(run, capsys):
    args = ["train", "--run", str(run), "--backbone", "resnet18", "--weights", "none", "--freeze", "none", "--epochs", "1", "--workers", "2", "--batch-size", "32", "--lr", "1e-3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "per-finding validation AUROC" in out and "Pneumonia" in out
    history = pd.read_csv(run / "train" / "history.csv")
    assert len(history) == 1 and history["world_size"].item() == 2
    defined = [f for f in ("Pneumonia", "Infiltration", "Atelectasis", "Effusion") if pd.notna(history[f"val_auroc_{f}"].item())]
    assert len(defined) == 4  # the commonest findings all have positives and negatives in validation
    assert (run / "train" / "best" / "model.pt").exists()


def test_evaluate_explain_report_and_predict(run, nih, capsys):
    assert main(["evaluate", "--run", str(run), "--bootstrap", "200", "--no-robustness"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    pneumonia = metrics["per_finding"]["Pneumonia"]
    assert pneumonia["ci_low"] <= pneumonia["auroc"] <= pneumonia["ci_high"]
    assert metrics["mean"]["ci_low"] <= metrics["mean_auroc"] <= metrics["mean"]["ci_high"]
    assert set(metrics["baselines"]) == {"metadata", "image_statistics"}
    if (nih / "collections.csv").exists():  # the two public collections, evaluated one by one
        test = pd.read_parquet(run / "eval" / "predictions.parquet")
        cohorts = metrics["subgroups"]["cohort"]
        assert set(cohorts) == set(test["cohort"])
        for value, entry in cohorts.items():
            rows = test["cohort"] == value
            assert entry["n_images"] == int(rows.sum())
            for finding, figures in entry["per_finding"].items():
                y = test.loc[rows, finding]
                if figures["auroc"] is not None:
                    assert figures["auroc"] == pytest.approx(roc_auc_score(y, test.loc[rows, f"prob_{finding}"]), abs=1e-9)
                else:
                    assert y[y >= 0].nunique() < 2
    assert main(["explain", "--run", str(run), "--max-images", "6"]) == 0
    out = capsys.readouterr().out
    assert "pointing game on" in out and "random point" in out  # NIH's radiologist boxes on held-out images
    assert main(["report", "--run", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 10_000
    image = nih / "images" / "00000061_012.png"
    assert main(["predict", str(run / "train" / "best"), str(image)]) == 0
    listing = capsys.readouterr().out
    assert str(image) in listing and all(f in listing for f in ("Pneumonia", "Hernia", "Cardiomegaly"))
