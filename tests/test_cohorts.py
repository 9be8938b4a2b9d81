"""Cohort assignment: one name for all, or a two-column file; unknown ids are reported."""
from __future__ import annotations

import pandas as pd
import pytest

from pipelines.cohorts import UNASSIGNED, assign_cohorts, read_cohort_file
from pipelines.manifest import ContractError


def test_one_name_for_every_image():
    ids = pd.Series(["a.png", "b.png"])
    result = assign_cohorts(ids, ids, name="site-1")
    assert result.cohorts.tolist() == ["site-1", "site-1"]


def test_a_cohorts_file_as_a_spreadsheet_saves_it(tmp_path):
    """NIH's header, a byte-order mark (Excel's CSV UTF-8), ids the collection does not list."""
    path = tmp_path / "collections.csv"
    pd.DataFrame({"Image Index": ["a.png", "b.png", "zz1.png", "zz2.png"], "collection": ["x", "y", "x", "y"]}).to_csv(
        path, index=False, encoding="utf-8-sig")
    manifest_ids = pd.Series(["a.png", "b.png", "c.png"])
    listed = pd.Series(["a.png", "b.png", "c.png", "q.png"])
    result = assign_cohorts(manifest_ids, listed, path=path)
    assert result.cohorts.tolist() == ["x", "y", UNASSIGNED]
    assert any("2 id(s) in collections.csv are not in the collection, e.g. zz1.png, zz2.png" in n for n in result.notes)
    assert any(f"1 image(s) not in collections.csv: cohort '{UNASSIGNED}'" in n for n in result.notes)


@pytest.mark.parametrize("text, message", [
    ("id,cohort\na.png,x\n", "first column must be the image id"),
    ("image_id,cohort,extra\na.png,x,1\n", "two columns"),
    ("image_id,cohort\na.png,\n", "empty id or cohort"),
    ("image_id,cohort\na.png,x\na.png,y\n", "two different cohorts"),
])
def test_bad_cohort_files_are_table_errors(tmp_path, text, message):
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(ContractError, match=message):
        read_cohort_file(path)


def test_name_and_file_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        assign_cohorts(pd.Series(["a"]), pd.Series(["a"]), name="x", path=tmp_path / "c.csv")


# --------------------------------------------------------------------------- through `cxr ingest`

from cxr.cli import main
from pipelines.phantoms import make_collection
from pipelines.rundir import RunDir


def test_ingest_with_a_cohorts_file_writes_the_cohort_column(tmp_path, capsys):
    made = make_collection(tmp_path / "p", n_patients=30, image_size=32, seed=1)
    extra = tmp_path / "cohorts.csv"
    extra.write_text(made.cohorts_csv.read_text() + "99999999_000.png,ward\n")
    run = tmp_path / "run"
    code = main(["ingest", "--run", str(run), "--source", "nih", "--csv", str(made.labels_csv), "--images", str(made.images), "--cohorts", str(extra)])
    out = capsys.readouterr().out
    assert code == 0, out
    manifest = pd.read_parquet(RunDir(run).manifest)
    assert set(manifest["cohort"]) == {"clinic", "ward"}
    assert manifest.groupby("patient_id")["cohort"].nunique().max() == 1, "a patient belongs to one cohort"
    assert "1 id(s) in cohorts.csv are not in the collection, e.g. 99999999_000.png" in out
    # the two cohorts differ in case mix: heart failure is seen on the ward
    mix = manifest.groupby("cohort")[["Cardiomegaly", "Effusion"]].mean()
    assert (mix.loc["ward"] > mix.loc["clinic"]).all()


def test_a_manifest_source_brings_its_cohort_and_a_blank_one_is_quarantined(tmp_path, capsys):
    from tests.helpers import chest_like, write_png

    images = tmp_path / "images"
    for i in range(6):
        write_png(images / f"x{i}.png", chest_like(32, seed=i))
    pd.DataFrame({"image_id": [f"x{i}" for i in range(6)], "path": [f"x{i}.png" for i in range(6)],
                  "patient_id": [f"p{i}" for i in range(6)], "Effusion": [0, 1] * 3,
                  "cohort": ["a", "a", "b", "b", "b", ""]}).to_csv(tmp_path / "m.csv", index=False)
    run = tmp_path / "run"
    assert main(["ingest", "--run", str(run), "--source", "manifest", "--csv", str(tmp_path / "m.csv"), "--images", str(images), "--max-reject-frac", "1"]) == 0
    manifest = pd.read_parquet(RunDir(run).manifest)
    quarantine = pd.read_parquet(RunDir(run).quarantine)
    assert list(manifest["cohort"]) == ["a", "a", "b", "b", "b"]
    assert quarantine["image_id"].tolist() == ["x5"] and "cohort" in quarantine["reason"].iloc[0]


def test_real_nih_collections(nih, tmp_path, capsys):
    """The shared subset's two public collections become the cohort column (317 and 984 images)."""
    collections = nih / "collections.csv"
    if not collections.exists():
        pytest.skip("collections.csv not in the shared data")
    run = tmp_path / "run"
    code = main(["ingest", "--run", str(run), "--source", "nih", "--csv", str(nih / "Data_Entry_2017_v2020.csv.gz"),
                 "--images", str(nih / "images"), "--cohorts", str(collections)])
    assert code == 0, capsys.readouterr()
    counts = pd.read_parquet(RunDir(run).manifest)["cohort"].value_counts().to_dict()
    assert counts == {"covid-normal-pneumonia": 984, "chexnet-starter": 317}
