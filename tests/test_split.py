"""Patient-level split: disjoint, deterministic, test and val seeded with rare positives."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.labels import FINDINGS
from pipelines.manifest import conform_manifest
from pipelines.split import LeakageError, audit_leakage, split_patients


def synthetic_manifest(n_patients: int = 300, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        chronic = rng.random(len(FINDINGS)) < np.linspace(0.25, 0.02, len(FINDINGS))
        for f in range(int(rng.integers(1, 5))):
            labels = (chronic | (rng.random(len(FINDINGS)) < 0.02)).astype(int)
            rows.append({"image_id": f"{p:08d}_{f:03d}.png", "path": f"{p:08d}_{f:03d}.png", "patient_id": f"{p:08d}", "study": f, "age": 50, "sex": "M", "view": "PA", **dict(zip(FINDINGS, labels)), "source": "nih"})
    return conform_manifest(pd.DataFrame(rows))


def test_no_patient_in_two_splits_and_every_image_in_one():
    m = synthetic_manifest()
    s = split_patients(m, 0.15, 0.15, 5, seed=0).splits
    assert len(s) == len(m) and set(s["image_id"]) == set(m["image_id"])
    assert s.groupby("patient_id")["split"].nunique().max() == 1
    fractions = s["split"].value_counts(normalize=True)
    assert abs(fractions["test"] - 0.15) < 0.06 and abs(fractions["val"] - 0.15) < 0.06


def test_same_seed_same_split_other_seed_other_split():
    m = synthetic_manifest()
    a = split_patients(m, seed=3).splits
    b = split_patients(m.sample(frac=1, random_state=0).reset_index(drop=True), seed=3).splits
    c = split_patients(m, seed=4).splits
    merged = a.merge(b, on="image_id")
    assert (merged["split_x"] == merged["split_y"]).all(), "row order of the manifest must not change the split"
    assert not a["split"].equals(c["split"])


def test_eval_splits_hold_min_positives_where_the_data_allows():
    m = synthetic_manifest()
    r = split_patients(m, 0.1, 0.1, 8, seed=0)
    pos = r.positives_per_split(m)
    total = (m[list(FINDINGS)] == 1).sum()
    for f in FINDINGS:
        for split in ("test", "val"):
            short = [s for s in r.shortfalls if s["finding"] == f and s["split"] == split]
            if short:
                assert pos.at[f, split] < 8 and total[f] < 8 * 3 + 3
            else:
                assert pos.at[f, split] >= 8
        assert pos.at[f, "train"] >= total[f] // 3 - 1, "training keeps a share of every finding"


def test_rare_finding_shortfall_is_reported():
    m = synthetic_manifest()
    m["Hernia"] = np.int8(0)
    m.loc[m.index[:3], "Hernia"] = 1  # three positive images
    r = split_patients(m, 0.15, 0.15, 10, seed=0)
    short = {(s["split"], s["finding"]) for s in r.shortfalls}
    assert ("test", "Hernia") in short and ("val", "Hernia") in short


def test_leakage_audit_fails_loudly():
    s = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"], "split": ["train", "test", "val"]})
    with pytest.raises(LeakageError, match="1 patient\\(s\\) appear in more than one split.*p1"):
        audit_leakage(s)
    ok = s.assign(split=["train", "train", "val"])
    audit_leakage(ok)
    with pytest.raises(LeakageError, match="in no split"):
        audit_leakage(ok, pd.DataFrame({"image_id": ["a", "b", "c", "d"]}))


@pytest.mark.parametrize("test_frac,val_frac", [(0.6, 0.5), (-0.1, 0.1), (1.0, 0.0)])
def test_bad_fractions_are_rejected(test_frac, val_frac):
    with pytest.raises(ValueError, match="frac"):
        split_patients(synthetic_manifest(20), test_frac, val_frac)


def test_patients_spelled_two_ways_are_one_patient_for_every_seed():
    """A manifest not made by ``cxr ingest`` (so not normalized): half of each patient's rows say
    ``766.0`` or `` 766 ``. The split groups by the normalized id and writes that spelling."""
    m = synthetic_manifest(60)
    m["patient_id"] = m["patient_id"].astype(int).astype(str)
    respelled = m.index % 2 == 1
    m.loc[respelled, "patient_id"] = [f"{p}.0" if i % 4 == 1 else f" {p} " for i, p in zip(m.index[respelled], m.loc[respelled, "patient_id"])]
    assert m["patient_id"].nunique() > 60
    for seed in range(5):
        s = split_patients(m, 0.2, 0.2, 2, seed=seed).splits
        assert s["patient_id"].nunique() == 60 and not s["patient_id"].str.contains(r"\.| ").any()
        assert s.groupby("patient_id")["split"].nunique().max() == 1, f"seed {seed} put a patient in two splits"


def test_leakage_audit_compares_normalized_ids():
    s = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["766.0", " 766", "767"], "split": ["train", "val", "train"]})
    with pytest.raises(LeakageError, match="1 patient\\(s\\) appear in more than one split.*766"):
        audit_leakage(s)


def test_split_refuses_images_without_a_patient():
    m = synthetic_manifest(10)
    m["patient_id"] = m["patient_id"].astype(object)
    m.loc[0, "patient_id"] = "  "
    with pytest.raises(ValueError, match="1 manifest image\\(s\\) have no patient_id"):
        split_patients(m)
