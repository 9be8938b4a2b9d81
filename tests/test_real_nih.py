"""The foundation on the real NIH subset, through the CLI: ingest, split, preprocess."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from cxr.cli import main
from pipelines.shards import images_from_column, split_dir

pytestmark = [pytest.mark.realdata, pytest.mark.ray]


@pytest.fixture(scope="module")
def run(tmp_path_factory, nih):
    run = tmp_path_factory.mktemp("nih_run")
    assert main(["ingest", "--run", str(run), "--source", "nih", "--csv", str(nih / "Data_Entry_2017_v2020.csv.gz"), "--images", str(nih / "images")]) == 0
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
    assert main(["preprocess", "--run", str(run), "--image-size", "32"]) == 0
    frames = [pd.read_parquet(split_dir(run / "shards", s), columns=["image_id", "image", "orig_mode"]) for s in ("train", "val", "test")]
    shards = pd.concat(frames)
    assert len(shards) == 1301 and shards["image_id"].is_unique
    assert (shards["orig_mode"] == "RGBA").sum() == 5
    assert images_from_column(shards["image"], 32).shape == (1301, 32, 32)
    stats = json.loads((run / "stats.json").read_text())
    assert stats["computed_on"] == "train" and 0.3 < stats["mean"] < 0.7
