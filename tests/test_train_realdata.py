"""A short training run on the real NIH subset: ~400 images of whole patients, patient-disjoint
split, 64x64 shards, ResNet18, 1 epoch on 2 CPU workers; per-finding validation AUROC comes back."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipelines.ingest import ingest
from pipelines.labels import FINDINGS
from pipelines.preprocess import preprocess, write_stats
from pipelines.shards import split_dir
from pipelines.split import split_patients
from trainers import TrainConfig, fit

pytestmark = [pytest.mark.realdata, pytest.mark.ray]


def test_short_resnet18_run_on_real_nih_reports_per_finding_auroc(nih, ray_local, tmp_path):
    manifest = ingest("nih", nih / "Data_Entry_2017_v2020.csv.gz", nih / "images").manifest
    patients = np.sort(manifest["patient_id"].unique())
    per_patient = manifest.groupby("patient_id").size().loc[patients].cumsum()
    subset = manifest[manifest["patient_id"].isin(per_patient[per_patient <= 400].index)].reset_index(drop=True)
    splits = split_patients(subset, test_frac=0.15, val_frac=0.25, min_positives=3, seed=0).splits
    run = tmp_path / "run"
    pre = preprocess(subset, splits, nih / "images", run / "shards", image_size=64)
    write_stats(pre.stats, run / "stats.json")

    cfg = TrainConfig(backbone="resnet18", weights="none", freeze="none", epochs=1, batch_size=16, workers=2)
    result = fit(run, cfg)

    row = result.metrics_history.iloc[0]
    val = pd.read_parquet(split_dir(run / "shards", "val"), columns=list(FINDINGS))
    assert row["val_images"] == len(val) == pre.written["val"]
    print(f"\nNIH subset: {pre.written} images; validation AUROC after 1 epoch:")
    for finding in FINDINGS:
        auroc = row[f"val_auroc_{finding}"]
        both_classes = val[finding].nunique() == 2
        assert math.isnan(auroc) != both_classes, finding  # defined exactly where val has both classes
        assert math.isnan(auroc) or 0.0 <= auroc <= 1.0
        print(f"  {finding:<20} {auroc:.3f}  ({int(val[finding].sum())} positives)")
    print(f"  {'mean':<20} {row['val_mean_auroc']:.3f}")
    assert not math.isnan(row["val_mean_auroc"])
    assert (run / "train" / "best" / "model.json").exists()
