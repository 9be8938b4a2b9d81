"""Ingest: every input row ends in the manifest or the quarantine, with a reason that names it."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.ingest import ingest
from pipelines.labels import FINDINGS
from pipelines.manifest import ContractError
from tests.helpers import chest_like, nih_row, write_nih_csv, write_png


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"):
        write_png(folder / name, chest_like(32))
    return folder


def test_nih_rows_parse_into_the_manifest(tmp_path, images):
    csv = write_nih_csv(
        tmp_path / "Data_Entry.csv",
        [nih_row("00000001_000.png", "Cardiomegaly|Effusion", 57), nih_row("00000001_001.png", "No Finding", 58, view="AP"), nih_row("00000002_000.png", "Hernia", 81, sex="F")],
    )
    r = ingest("nih", csv, images)
    assert r.rows_in == 3 and len(r.manifest) == 3 and len(r.quarantine) == 0
    first = r.manifest.iloc[0]
    assert first["patient_id"] == "00000001" and first["study"] == 0 and first["age"] == 57 and first["view"] == "PA"
    assert first["Cardiomegaly"] == 1 and first["Effusion"] == 1 and first["Mass"] == 0
    assert r.manifest.loc[1, list(FINDINGS)].sum() == 0
    assert r.manifest.loc[2, "sex"] == "F" and r.manifest.loc[2, "Hernia"] == 1
    assert str(r.manifest["Hernia"].dtype) == "int8"


def test_bad_rows_are_quarantined_with_their_reason(tmp_path, images):
    csv = write_nih_csv(
        tmp_path / "Data_Entry.csv",
        [
            nih_row("00000001_000.png", "Cardiomegaly"),
            nih_row("00000001_001.png", "Cardiomegaly|Dragon"),  # unknown label
            "00000002_000.png,Mass,0,2",  # malformed: too few fields
            nih_row("00000004_000.png", "Mass"),  # listed, not on disk
            nih_row("00000003_000.png", "Mass", age="old"),  # unparseable age
        ],
    )
    r = ingest("nih", csv, images)
    assert r.rows_in == 5 and len(r.manifest) == 1 and len(r.quarantine) == 4
    reasons = dict(zip(r.quarantine["row"], r.quarantine["reason"]))
    assert reasons[2] == "unknown label(s) 'Dragon'"
    assert reasons[3].startswith("malformed row")
    assert reasons[4] == "missing file"
    assert reasons[5] == "row 5: Patient Age 'old' is not a number"  # the reason names the row and the value
    # nothing lost: the raw record travels with the reason
    record = json.loads(r.quarantine.set_index("row").loc[2, "record"])
    assert record["Finding Labels"] == "Cardiomegaly|Dragon"
    assert set(r.quarantine["stage"]) == {"ingest"}


def test_missing_column_is_a_table_level_error(tmp_path, images):
    csv = tmp_path / "bad.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n")
    with pytest.raises(ContractError, match="missing required column.*Follow-up #"):
        ingest("nih", csv, images)


def test_paths_escaping_the_image_root_are_rejected(tmp_path, images):
    outside = write_png(tmp_path / "outside.png", chest_like(32))
    (images / "link.png").symlink_to(outside)
    manifest = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "path": ["00000001_000.png", "../outside.png", str(outside), "link.png"],
            "patient_id": ["p1", "p2", "p3", "p4"],
            "Mass": [1, 0, 0, 1],
        }
    )
    csv = tmp_path / "manifest.csv"
    manifest.to_csv(csv, index=False)
    r = ingest("manifest", csv, images)
    assert list(r.manifest["image_id"]) == ["a"]
    reasons = dict(zip(r.quarantine["image_id"], r.quarantine["reason"]))
    assert reasons["b"].startswith("path escapes image root")
    assert reasons["c"].startswith("path escapes image root")
    assert reasons["d"].startswith("path escapes image root")


def test_generic_manifest_parquet_with_uncertain_labels(tmp_path, images):
    frame = pd.DataFrame({"image_id": ["x1", "x2"], "path": ["00000001_000.png", "00000002_000.png"], "patient_id": ["p1", "p2"], "Edema": [-1, 2], "age": [40, 50], "sex": ["female", "M"]})
    path = tmp_path / "m.parquet"
    frame.to_parquet(path)
    r = ingest("manifest", path, images)
    assert list(r.manifest["image_id"]) == ["x1"]
    assert r.manifest.loc[0, "Edema"] == -1 and r.manifest.loc[0, "sex"] == "F"
    assert r.quarantine.loc[0, "reason"] == "unknown label value(s) Edema='2'"
    assert any("absent, recorded as 0" in n for n in r.notes)


def test_chexpert_maps_names_keeps_uncertain_and_takes_patient_from_path(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    for rel in ("train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study2/view2_lateral.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(chest_like(32)).save(root / rel)
    csv = tmp_path / "train.csv"
    csv.write_text(
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Pleural Effusion,Edema,Support Devices\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,,1.0,-1.0,,1.0\n"
        "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Male,87,Lateral,,,0.0,,1.0,\n"
        "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,40,Frontal,PA,1.0,,,,\n"
        "CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Male,40,Frontal,PA,,maybe,,,\n"
    )
    r = ingest("chexpert", csv, root)
    assert r.rows_in == 4 and len(r.manifest) == 2
    first, second = r.manifest.iloc[0], r.manifest.iloc[1]
    assert first["patient_id"] == "patient00001" and first["study"] == 1 and first["sex"] == "F" and first["view"] == "AP"
    assert first["Cardiomegaly"] == 1 and first["Effusion"] == -1 and first["Edema"] == 0
    assert second["view"] == "LATERAL" and second["Edema"] == 1
    assert first["path"] == "train/patient00001/study1/view1_frontal.jpg"
    reasons = sorted(r.quarantine["reason"])
    assert reasons == ["missing file", "unknown label value(s) Cardiomegaly='maybe'"]
    assert any("does not annotate" in n for n in r.notes)


def test_unknown_source_and_missing_label_file(tmp_path, images):
    with pytest.raises(ValueError, match="unknown source"):
        ingest("dicomweb", tmp_path / "x.csv", images)
    with pytest.raises(FileNotFoundError, match="label file not found"):
        ingest("nih", tmp_path / "absent.csv", images)
