"""Ingest and split on label files as people and tools really write them (issue 17): ids respelled
by pandas, paths naming one file twice, bad values in one row, a column wrong in most rows, link
loops under the image root, byte-order marks and Latin-1, small collections.

Every file here is made the way the tool in question makes it (``DataFrame.to_csv``, a float column
that pandas produced from a real blank cell, ``os.symlink``), and every ingest is checked for its
accounting: rows in = manifest + quarantine. No test needs Ray.
"""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr import stages
from cxr.cli import main
from cxr.settings import SplitSection, ValidateSection
from pipelines.ids import normalize_id, normalize_ids
from pipelines.ingest import _files_under, ingest
from pipelines.labels import FINDINGS
from pipelines.manifest import ContractError
from pipelines.reject_guard import MassRejectionError, Rejection, check_max_reject_frac, guard_rejections
from pipelines.rundir import RunDir
from tests.helpers import chest_like, nih_row, write_nih_csv, write_png

GOOD_AGES = 50


def nih_images(folder: Path, patients: int, per_patient: int = 3, start: int = 1) -> list[str]:
    """NIH-named PNGs: ``per_patient`` follow-ups of each patient, numbered from ``start``."""
    ids = [f"{p:08d}_{f:03d}.png" for p in range(start, start + patients) for f in range(per_patient)]
    for i, image_id in enumerate(ids):
        write_png(folder / image_id, chest_like(32, seed=i))
    return ids


def nih_rows(ids: list[str]) -> list[str]:
    """One label row per image; every third image has a Mass (so the split has positives)."""
    return [nih_row(i, "Mass" if n % 3 == 0 else "No Finding", GOOD_AGES) for n, i in enumerate(ids)]


def accounting(run: RunDir) -> tuple[int, int, int]:
    """(rows in, manifest rows, quarantine rows), checking that the files agree with source.json."""
    info = json.loads(run.source_json.read_text())
    manifest, quarantine = pd.read_parquet(run.manifest), pd.read_parquet(run.quarantine)
    assert info["rows_in"] == len(manifest) + len(quarantine), "rows in = manifest + quarantine"
    return info["rows_in"], len(manifest), len(quarantine)


def written(run: RunDir) -> list[str]:
    """The run directory's tables and summary that exist (a stopped stage must leave none)."""
    paths = [run.manifest, run.quarantine, run.source_json, run.splits, run.validation / "summary.json"]
    return [p.name for p in paths if p.exists()]


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) when the body takes longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a directory walk that never ends?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- 1. identifiers


@pytest.mark.parametrize(
    "raw,expected",
    [("766", "766"), ("766.0", "766"), (" 766.000 ", "766"), (766.0, "766"), ("00766", "00766"), ("p-766", "p-766"), ("7.5", "7.5"), ("", None), ("  ", None), (None, None), (np.nan, None)],
)
def test_one_spelling_per_id(raw, expected):
    assert normalize_id(raw) == expected
    assert list(normalize_ids(pd.Series([raw], dtype=object)).astype(object).where(lambda s: s.notna(), None)) == [expected]


def test_nih_patient_id_written_as_floats_gives_the_zero_padded_id(tmp_path):
    """pandas reads a ``Patient ID`` column with one blank cell as floats and writes it back as
    ``2.0``: every row but the blank one must keep its patient (not 23 of 24 quarantined by the
    naming check, as before)."""
    ids = nih_images(tmp_path / "images", patients=8)
    rows = nih_rows(ids)
    fields = rows[0].split(",")
    fields[3] = ""  # a real blank Patient ID cell
    rows[0] = ",".join(fields)
    original = write_nih_csv(tmp_path / "original.csv", rows)
    resaved = tmp_path / "Data_Entry.csv"
    pd.read_csv(original).to_csv(resaved, index=False)
    assert ",2.0," in resaved.read_text(), "pandas wrote the patient column as floats"

    run = RunDir(tmp_path / "run")
    summary = stages.ingest_collection(run, "nih", resaved, tmp_path / "images")
    assert accounting(run) == (24, 23, 1)
    manifest = pd.read_parquet(run.manifest)
    assert set(manifest["patient_id"]) == {f"{p:08d}" for p in range(1, 9)}
    assert (manifest["image_id"].str[:8] == manifest["patient_id"]).all()
    assert "ids normalized: 23 patient_id (e.g. '1.0' -> '1')" in summary
    (blank,) = pd.read_parquet(run.quarantine).itertuples()
    assert blank.row == 1 and "patient_id" in blank.reason


def test_manifest_patient_766_0_and_766_is_one_patient_in_every_split(tmp_path):
    """A manifest assembled from two exports: the first from a frame whose patient column pandas
    had read as floats (one blank cell, dropped before saving), the second appended with plain
    integers. Patient 766 is written ``766.0`` in some rows and ``766`` in others; ``cxr split``
    must keep each patient in one split for every seed."""
    images = tmp_path / "images"
    patients = list(range(760, 790))
    records = []
    for p in patients:
        for f in range(4):
            name = f"p{p}_{f}.png"
            write_png(images / name, chest_like(32, seed=p * 10 + f))
            records.append({"image_id": name, "path": name, "patient_id": p, "Mass": int(f == 0 and p % 2 == 0), "Effusion": int(f == 1 and p % 3 == 0)})
    frame = pd.DataFrame(records)
    first, second = frame.iloc[::2], frame.iloc[1::2]  # every patient has images in both exports
    blank = pd.DataFrame([{"image_id": "unlabelled", "path": "unlabelled.png", "patient_id": None, "Mass": 0, "Effusion": 0}])
    staged = tmp_path / "export1.csv"
    pd.concat([first, blank]).to_csv(staged, index=False)
    floats = pd.read_csv(staged)  # the blank makes the patient column float64
    floats.dropna(subset=["patient_id"]).to_csv(tmp_path / "labels.csv", index=False)
    second.to_csv(tmp_path / "labels.csv", mode="a", header=False, index=False)
    text = (tmp_path / "labels.csv").read_text()
    assert ",766.0," in text and ",766," in text

    run = RunDir(tmp_path / "run")
    summary = stages.ingest_collection(run, "manifest", tmp_path / "labels.csv", images)
    assert accounting(run) == (120, 120, 0)
    assert "ids normalized: 60 patient_id (e.g. '760.0' -> '760')" in summary
    assert set(pd.read_parquet(run.manifest)["patient_id"]) == {str(p) for p in patients}
    for seed in range(5):
        out = stages.split_stage(run, SplitSection(0.15, 0.15, 2, seed))
        splits = pd.read_parquet(run.splits)
        assert splits.groupby(normalize_ids(splits["patient_id"]))["split"].nunique().max() == 1, f"seed {seed} leaks"
        assert "leakage audit: 0 patients shared between splits" in out
        assert splits.groupby("patient_id").size().max() == 4, "each patient's four images stay together"


def test_split_suite_sees_a_leak_however_the_id_is_spelled(tmp_path):
    """A splits table made elsewhere, patient 766 spelled ``766.0`` in train and ``766`` in val:
    the GX leak check compares normalized ids, so it fails (comparing text, it passed)."""
    from validation import validate_splits

    manifest = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": ["766", "766", "767", "768"], **{f: 0 for f in FINDINGS}})
    splits = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": ["766.0", " 766", "767", "768"], "split": ["train", "val", "train", "test"]})
    result = validate_splits(manifest, splits, tmp_path / "validation", test_frac=0.25, val_frac=0.25, tolerance=1.0)
    failed = [o.name for o in result.table_failures]
    assert failed == ["expect_column_values_to_be_unique(patient_id over one row per patient and split: no patient in two splits)"]


# --------------------------------------------------------------------------- 2. one file, two rows


def test_rows_resolving_to_one_file_are_all_quarantined(tmp_path):
    images = tmp_path / "images"
    for name in ("x.png", "y.png", "z.png", "w.png", "v.png"):
        write_png(images / name, chest_like(32))
    (images / "z_link.png").symlink_to("z.png")
    listed = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "path": ["x.png", "./x.png", "y.png", "y.png", "z.png", "z_link.png", "w.png", "./v.png"],
            "patient_id": ["1", "1", "2", "3", "4", "4", "5", "6"],
            "Mass": [1, 0, 0, 1, 0, 0, 1, 0],
        }
    )
    listed.to_csv(tmp_path / "labels.csv", index=False)
    r = ingest("manifest", tmp_path / "labels.csv", images)
    assert r.rows_in == 8 == len(r.manifest) + len(r.quarantine)
    assert list(r.manifest["image_id"]) == ["g", "h"]
    assert list(r.manifest["path"]) == ["w.png", "v.png"], "a path is kept as the image root lists it"
    reasons = dict(zip(r.quarantine["image_id"], r.quarantine["reason"]))
    assert reasons["a"] == reasons["b"] == "duplicate file: rows 1, 2 resolve to the same file 'x.png' (listed as 'x.png', './x.png')"
    assert reasons["c"] == reasons["d"] == "duplicate file: rows 3, 4 resolve to the same file 'y.png' (listed as 'y.png')"
    assert reasons["e"] == reasons["f"] == "duplicate file: rows 5, 6 resolve to the same file 'z.png' (listed as 'z.png', 'z_link.png')"
    assert r.reason_counts() == {"duplicate file": 6}
    real = [os.path.realpath(images / p) for p in r.manifest["path"]]
    assert len(set(real)) == len(real), "preprocess sees each file once"


# --------------------------------------------------------------------------- 3. a bad value quarantines its row

BAD_AGES = {"nan": "is not a finite number", "inf": "is not a finite number", "-5": "is outside 0..120", "40000": "is outside 0..120", "12.5": "is not a whole number", "old": "is not a number"}
GOOD_AGE_SPELLINGS = {"12.0": 12, "058Y": 58, " 7 ": 7}
BAD_STUDIES = {"12.5": "is not a whole number", "nan": "is not a finite number", "-1": "is outside 0..2147483647", "1e12": "is outside 0..2147483647"}


def _value_rows() -> list[tuple[str, str]]:
    """(age, study) per row: each bad age, each good spelling, each bad study, a float study."""
    return [*((a, "0") for a in BAD_AGES), *((a, "1") for a in GOOD_AGE_SPELLINGS), *(("40", s) for s in BAD_STUDIES), ("41", "12.0")]


def _write_source(source: str, tmp_path: Path, values: list[tuple[str, str]]) -> tuple[Path, Path, dict[str, str]]:
    """A label file of ``source`` with one image per (age, study); returns it, the image root and
    the column names that source gives age and study."""
    images = tmp_path / "images"
    if source == "nih":
        ids = nih_images(images, patients=len(values), per_patient=1)
        frame = pd.read_csv(write_nih_csv(tmp_path / "clean.csv", nih_rows(ids)), dtype=str)
        frame["Patient Age"] = [a for a, _ in values]
        frame["Follow-up #"] = [s for _, s in values]
        path = tmp_path / "Data_Entry.csv"
        frame.to_csv(path, index=False)
        return path, images, {"age": "Patient Age", "study": "Follow-up #"}
    if source == "chexpert":
        root = tmp_path / "CheXpert-v1.0-small"
        paths = [f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_frontal.jpg" for n in range(1, len(values) + 1)]  # study: from the path
        for p in paths:
            write_png(root / p.split("/", 1)[1], chest_like(32))
        frame = pd.DataFrame({"Path": paths, "Sex": "Female", "Age": [a for a, _ in values], "Frontal/Lateral": "Frontal", "AP/PA": "AP", "Cardiomegaly": "1.0"})
        path = tmp_path / "train.csv"
        frame.to_csv(path, index=False)
        return path, root, {"age": "Age"}
    names = [f"img{n}.png" for n in range(len(values))]
    for name in names:
        write_png(images / name, chest_like(32))
    frame = pd.DataFrame({"image_id": names, "path": names, "patient_id": [str(n) for n in range(len(values))], "age": [a for a, _ in values], "study": [s for _, s in values], "Mass": 0})
    if source == "manifest-parquet":
        path = tmp_path / "manifest.parquet"
        frame.to_parquet(path)
    else:
        path = tmp_path / "manifest.csv"
        frame.to_csv(path, index=False)
    return path, images, {"age": "age", "study": "study"}


@pytest.mark.parametrize("source", ["nih", "chexpert", "manifest", "manifest-parquet"])
def test_bad_ages_and_studies_quarantine_their_row_naming_row_and_value(tmp_path, source):
    values = _value_rows()
    path, root, columns = _write_source(source, tmp_path, values)
    r = ingest("manifest" if source.startswith("manifest") else source, path, root)
    assert r.rows_in == len(values) == len(r.manifest) + len(r.quarantine)
    reasons = dict(zip(r.quarantine["row"], r.quarantine["reason"]))
    for row, (age, _) in enumerate(values, start=1):
        if age in BAD_AGES:
            assert reasons[row] == f"row {row}: {columns['age']} {age.strip()!r} {BAD_AGES[age]}"
    ages = dict(zip(r.source_rows, r.manifest["age"]))
    for row, (age, _) in enumerate(values, start=1):
        if age in GOOD_AGE_SPELLINGS:
            assert ages[row] == GOOD_AGE_SPELLINGS[age]
    if "study" in columns:
        studies = dict(zip(r.source_rows, r.manifest["study"]))
        for row, (_, study) in enumerate(values, start=1):
            if study in BAD_STUDIES:
                assert reasons[row] == f"row {row}: {columns['study']} {study!r} {BAD_STUDIES[study]}"
            elif study == "12.0":
                assert studies[row] == 12
    expected_kept = len(GOOD_AGE_SPELLINGS) + 1 + (0 if "study" in columns else len(BAD_STUDIES))
    assert len(r.manifest) == expected_kept


def test_one_bad_record_never_aborts_an_ingest_and_is_quarantined_once(tmp_path):
    """nan, inf and 40000 in three of 24 rows: before, a traceback (OverflowError, a cast error);
    now three quarantine rows from ingest, and the manifest suite's own age check (0..120, the same
    range) has nothing left to reject."""
    ids = nih_images(tmp_path / "images", patients=8)
    frame = pd.read_csv(write_nih_csv(tmp_path / "clean.csv", nih_rows(ids)), dtype=str)
    frame.loc[[4, 9, 16], "Patient Age"] = ["nan", "inf", "40000"]
    frame.to_csv(tmp_path / "Data_Entry.csv", index=False)
    run = RunDir(tmp_path / "run")
    summary = stages.ingest_collection(run, "nih", tmp_path / "Data_Entry.csv", tmp_path / "images")
    assert accounting(run) == (24, 21, 3)
    q = pd.read_parquet(run.quarantine)
    assert list(q["stage"]) == ["ingest"] * 3
    assert list(q["reason"]) == ["row 5: Patient Age 'nan' is not a finite number", "row 10: Patient Age 'inf' is not a finite number", "row 17: Patient Age '40000' is outside 0..120"]
    assert "expect_column_values_to_be_between(age" not in summary and "0 of 24 records quarantined" not in summary
    assert "manifest: passed with 1 warning (" in summary, "the suite quarantines nothing more (its only note: 3 images without a row)"


def test_a_parquet_float_age_column(tmp_path):
    """In Parquet a float column's NaN is pandas' missing value (an unknown age, kept); inf, 40000
    and 12.5 are values, and bad ones."""
    names = [f"img{n}.png" for n in range(5)]
    for name in names:
        write_png(tmp_path / "images" / name, chest_like(32))
    ages = [58.0, float("inf"), 40000.0, 12.5, float("nan")]
    pd.DataFrame({"image_id": names, "path": names, "patient_id": [1.0, 2.0, 3.0, 4.0, 5.0], "age": ages, "Mass": 0}).to_parquet(tmp_path / "m.parquet")
    r = ingest("manifest", tmp_path / "m.parquet", tmp_path / "images")
    assert r.rows_in == 5 == len(r.manifest) + len(r.quarantine)
    assert list(r.manifest["image_id"]) == ["img0.png", "img4.png"] and r.manifest["age"].iloc[0] == 58 and pd.isna(r.manifest["age"].iloc[1])
    assert list(r.manifest["patient_id"]) == ["1", "5"], "float ids from Parquet are normalized too"
    assert list(r.quarantine["reason"]) == ["row 2: age 'inf' is not a finite number", "row 3: age '40000.0' is outside 0..120", "row 4: age '12.5' is not a whole number"]


def test_a_study_column_written_as_floats_is_accepted(tmp_path):
    """pandas writes a study column with one blank cell as ``12.0``: all 40 rows are kept (before,
    39 of 40 were rejected as unparseable)."""
    images = tmp_path / "images"
    names = [f"img{n}.png" for n in range(40)]
    for name in names:
        write_png(images / name, chest_like(32))
    studies = [None, *range(1, 40)]
    frame = pd.DataFrame({"image_id": names, "path": names, "patient_id": [f"p{n // 2}" for n in range(40)], "study": studies, "Mass": 0})
    frame.to_csv(tmp_path / "labels.csv", index=False)
    assert ",12.0," in (tmp_path / "labels.csv").read_text()
    r = ingest("manifest", tmp_path / "labels.csv", images)
    assert len(r.manifest) == 40 and len(r.quarantine) == 0
    assert r.manifest["study"].isna().sum() == 1 and list(r.manifest["study"].dropna()) == list(range(1, 40))


# --------------------------------------------------------------------------- 4. the mass-rejection guard


def _rejections(kind: str, rows: range, column: str = "Patient Age", exempt: bool = False) -> list[Rejection]:
    return [Rejection(kind, column, f"row {r}", "40000", exempt) for r in rows]


def test_guard_trips_on_one_reason_over_the_fraction_and_says_how_to_proceed():
    over = _rejections("age outside 0..120", range(1, 31))  # 30 of 100 rows
    with pytest.raises(MassRejectionError) as err:
        guard_rejections(over, 100, 0.2)
    message = str(err.value)
    assert "'age outside 0..120' (column 'Patient Age'): 30 of 100 rows (30%)" in message
    assert "e.g. row 1: '40000'; row 2: '40000'; row 3: '40000'" in message and "row 4:" not in message
    assert "nothing was written" in message and "--max-reject-frac 1" in message
    guard_rejections(over, 100, 0.3)  # 30 is not more than 30% of 100
    guard_rejections(over, 100, 1)  # off
    # several reasons, each under the limit: no stop
    guard_rejections(_rejections("a", range(1, 16)) + _rejections("b", range(16, 31)), 100, 0.2)


def test_guard_exempts_rows_absent_on_disk_and_never_stops_on_one_row():
    missing = _rejections("missing file", range(1, 1001), column="path")  # a partial download
    guard_rejections(missing, 1100, 0.2)
    # 30 bad ages among the 100 rows whose images exist: 30%, absent rows do not dilute it ...
    bad = _rejections("age outside 0..120", range(1001, 1031))
    with pytest.raises(MassRejectionError, match="30 of 100 rows"):
        guard_rejections(missing + bad, 1100, 0.2)
    # ... nor inflate it: a bad age on a row whose image is absent is not counted
    absent_bad = _rejections("age outside 0..120", range(2000, 2100), exempt=True)
    guard_rejections(missing + absent_bad + bad[:5], 1200, 0.2)
    guard_rejections(bad[:1], 2, 0.2)  # one record (50% of two rows) never aborts
    with pytest.raises(MassRejectionError):
        guard_rejections(bad[:2], 3, 0.2)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_max_reject_frac_must_be_a_fraction(value):
    with pytest.raises(ValueError, match="--max-reject-frac must be between 0 and 1"):
        check_max_reject_frac(value)


def test_cxr_ingest_stops_on_a_bad_column_and_writes_nothing(tmp_path, capsys):
    ids = nih_images(tmp_path / "images", patients=8)
    frame = pd.read_csv(write_nih_csv(tmp_path / "clean.csv", nih_rows(ids)), dtype=str)
    frame.loc[2:, "Patient Age"] = "40000"  # 22 of 24 rows: the column is wrong, not the records
    frame.to_csv(tmp_path / "Data_Entry.csv", index=False)
    run = tmp_path / "run"
    args = ["ingest", "--run", str(run), "--source", "nih", "--csv", str(tmp_path / "Data_Entry.csv"), "--images", str(tmp_path / "images")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "'age outside 0..120' (column 'Patient Age'): 22 of 24 rows (92%), e.g. row 3: '40000'; row 4: '40000'; row 5: '40000'" in err
    assert "--max-reject-frac 1" in err and "Traceback" not in err
    assert not run.exists(), "nothing written, not even the run directory"
    assert main([*args, "--max-reject-frac", "1"]) == 0  # today's behaviour: quarantine them
    assert accounting(RunDir(run)) == (24, 2, 22)


def test_a_partial_download_is_not_a_mass_rejection(tmp_path):
    """The label file lists 40 images, 6 are on disk (as NIH's full label file over a subset)."""
    listed = [f"{p:08d}_000.png" for p in range(1, 41)]
    for image_id in listed[:6]:
        write_png(tmp_path / "images" / image_id, chest_like(32))
    write_nih_csv(tmp_path / "Data_Entry.csv", nih_rows(listed))
    run = RunDir(tmp_path / "run")
    summary = stages.ingest_collection(run, "nih", tmp_path / "Data_Entry.csv", tmp_path / "images")
    assert accounting(run) == (40, 6, 34)
    assert "quarantined      34  missing file" in summary


def test_a_mass_rejection_by_the_manifest_suite_writes_no_table(tmp_path):
    """The reason can come from the manifest suite (sex outside M/F/U in most rows): the suite
    runs, and its report page is the evidence the error names; no table is written."""
    ids = nih_images(tmp_path / "images", patients=8)
    frame = pd.read_csv(write_nih_csv(tmp_path / "clean.csv", nih_rows(ids)), dtype=str)
    frame.loc[4:, "Patient Gender"] = "X"
    frame.to_csv(tmp_path / "Data_Entry.csv", index=False)
    run = RunDir(tmp_path / "run")
    with pytest.raises(MassRejectionError) as err:
        stages.ingest_collection(run, "nih", tmp_path / "Data_Entry.csv", tmp_path / "images")
    message = str(err.value)
    assert "'expect_column_values_to_be_in_set(sex, {M, F, U})' (column 'sex'): 20 of 24 rows (83%), e.g. row 5: 'X'; row 6: 'X'; row 7: 'X'" in message
    assert "report: " in message
    assert written(run) == []
    stages.ingest_collection(run, "nih", tmp_path / "Data_Entry.csv", tmp_path / "images", max_reject_frac=1)
    assert accounting(run) == (24, 4, 20)


def test_cxr_validate_stops_before_moving_rows(tmp_path):
    ids = nih_images(tmp_path / "images", patients=8)
    write_nih_csv(tmp_path / "Data_Entry.csv", nih_rows(ids))
    run = RunDir(tmp_path / "run")
    stages.ingest_collection(run, "nih", tmp_path / "Data_Entry.csv", tmp_path / "images")
    manifest = pd.read_parquet(run.manifest)
    manifest.loc[3:, "view"] = "FRONTAL"  # edited by hand or made elsewhere: most rows fail the view check
    manifest.to_parquet(run.manifest, index=False)
    before = {p: p.read_bytes() for p in (run.manifest, run.quarantine)}
    with pytest.raises(MassRejectionError, match=r"(?s)validate stopped.*'view'.*21 of 24 rows.*manifest row 4 \(00000002_000.png\): 'FRONTAL'"):
        stages.validate_stage(run, ValidateSection())
    assert {p: p.read_bytes() for p in before} == before, "manifest and quarantine unchanged"
    out = stages.validate_stage(run, ValidateSection(max_reject_frac=1))
    assert "moved 21 manifest row(s) to the quarantine; 3 remain" in out
    assert len(pd.read_parquet(run.manifest)) == 3 and len(pd.read_parquet(run.quarantine)) == 21


def test_cxr_run_config_carries_max_reject_frac(tmp_path, monkeypatch):
    import yaml

    from cxr.config import ConfigError, load_config
    from cxr.pipeline import build_stages

    (tmp_path / "labels.csv").write_text("image_id,path,patient_id,Mass\n")
    (tmp_path / "images").mkdir()
    base = {"run": {"dir": "run"}, "data": {"source": "manifest", "csv": "labels.csv", "images": "images"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    config = load_config(tmp_path / "c.yaml")
    assert config.data.max_reject_frac == 0.2 and config.validate.max_reject_frac == 0.2
    config = load_config(tmp_path / "c.yaml", ["data.max_reject_frac=1", "validate.max_reject_frac=0.5"])
    calls = {}
    monkeypatch.setattr(stages, "ingest_stage", lambda run, data: calls.setdefault("ingest", data) and "")
    monkeypatch.setattr(stages, "validate_stage", lambda run, settings: calls.setdefault("validate", settings) and "")
    for stage in build_stages(config)[:2]:
        stage.action(RunDir(tmp_path / "run"), False)
    assert calls["ingest"].max_reject_frac == 1.0 and calls["validate"].max_reject_frac == 0.5
    with pytest.raises(ConfigError, match="data.max_reject_frac must be between 0 and 1"):
        load_config(tmp_path / "c.yaml", ["data.max_reject_frac=1.5"])


# --------------------------------------------------------------------------- 5. link loops


def test_link_loops_under_the_image_root_do_not_hang_ingest(tmp_path):
    root = tmp_path / "images"
    for rel in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        write_png(root / rel, chest_like(32))
    write_png(tmp_path / "outside" / "o.png", chest_like(32))
    os.symlink(".", root / "loop1")  # two links to the root itself
    os.symlink(".", root / "loop2")
    os.symlink("..", root / "sub" / "up")  # a link to an ancestor
    os.symlink("sub", root / "alias")  # a linked subfolder inside the root: legitimate
    os.symlink(tmp_path / "outside", root / "elsewhere")  # outside the root: its files are rejected
    with deadline(30):
        files = _files_under(root)
    assert files == {"a.png", "sub/b.png", "sub/deeper/c.png"}, "each real file once, under its own path"
    listed = pd.DataFrame(
        {"image_id": ["a", "b", "c", "o"], "path": ["a.png", "alias/b.png", "loop1/loop2/sub/deeper/c.png", "elsewhere/o.png"], "patient_id": ["1", "2", "3", "4"], "Mass": [1, 0, 0, 1]}
    )
    listed.to_csv(tmp_path / "labels.csv", index=False)
    with deadline(30):
        r = ingest("manifest", tmp_path / "labels.csv", root)
    assert r.rows_in == 4 == len(r.manifest) + len(r.quarantine)
    assert list(r.manifest["image_id"]) == ["a", "b", "c"], "paths through links inside the root are found"
    assert r.quarantine["reason"].tolist() == ["path escapes image root (a link resolves outside it: 'elsewhere/o.png')"]


# --------------------------------------------------------------------------- 6. encodings


@pytest.mark.parametrize("source", ["nih", "chexpert", "manifest"])
def test_a_utf8_byte_order_mark_is_read_for_every_csv_source(tmp_path, source):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark (pandas: encoding="utf-8-sig")."""
    path, root, _ = _write_source(source, tmp_path, [("40", "0"), ("41", "1"), ("42", "2")])
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.to_csv(path, index=False, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    r = ingest(source, path, root)
    assert len(r.manifest) == 3 and len(r.quarantine) == 0


def test_a_latin1_label_file_is_an_error_naming_the_file_byte_offset_and_line(tmp_path, capsys):
    """Chosen behaviour (README): not guessed, refused with where the first non-UTF-8 byte is."""
    names = ["a.png", "b.png", "c.png"]
    for name in names:
        write_png(tmp_path / "images" / name, chest_like(32))
    frame = pd.DataFrame({"image_id": names, "path": names, "patient_id": ["1", "2", "3"], "Mass": 0, "source": ["Clinique", "Clinique", "Hôpital Saint-Éloi"]})
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False, encoding="latin-1")
    data = path.read_bytes()
    offset = data.index("ô".encode("latin-1"))
    with pytest.raises(ContractError) as err:
        ingest("manifest", path, tmp_path / "images")
    assert f"{path} is not UTF-8 text: byte 0xf4 at byte offset {offset} (line 4)" in str(err.value)
    assert "CSV UTF-8" in str(err.value) and "iconv" in str(err.value)
    assert main(["ingest", "--run", str(tmp_path / "run"), "--source", "manifest", "--csv", str(path), "--images", str(tmp_path / "images")]) == 1
    assert f"byte offset {offset}" in capsys.readouterr().err


# --------------------------------------------------------------------------- 7. split fractions on small collections


def small_manifest(seed: int = 7) -> pd.DataFrame:
    """42 images of 17 patients with 1 to 4 images each, findings scattered."""
    from pipelines.manifest import conform_manifest

    rng = np.random.default_rng(seed)
    sizes = [4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1]
    assert sum(sizes) == 42
    rows = []
    for p, n in enumerate(sizes, start=1):
        for f in range(n):
            labels = (rng.random(len(FINDINGS)) < 0.03).astype(int)
            rows.append({"image_id": f"{p:08d}_{f:03d}.png", "path": f"{p:08d}_{f:03d}.png", "patient_id": f"{p:08d}", "study": f, "age": 50, "sex": "M", "view": "PA", **dict(zip(FINDINGS, labels)), "source": "nih"})
    return conform_manifest(pd.DataFrame(rows))


def test_a_split_of_42_images_passes_its_fraction_check_despite_whole_patients(tmp_path):
    """0.2 / 0.2 of 42 images: each evaluation split overshoots its 8.4 images by part of a
    patient, so training lands below 0.55 for some seeds (the old check failed there); the
    tolerance now allows what whole patients force, and every seed passes."""
    from pipelines.manifest import write_table
    from pipelines.split import split_patients

    run = RunDir(tmp_path / "run")
    run.ensure()
    manifest = small_manifest()
    write_table(manifest, run.manifest)
    seeds = (0, 2, 4)
    train = {seed: (split_patients(manifest, 0.2, 0.2, 10, seed=seed).splits["split"] == "train").mean() for seed in seeds}
    assert any(not 0.55 <= t <= 0.65 for t in train.values()), f"no seed shows the rounding case: {train}"
    for seed in seeds:
        out = stages.split_stage(run, SplitSection(0.2, 0.2, 10, seed))  # raises ValidationFailed on a table-level failure
        assert "splits: " in out and "table-level failure" not in out


def test_the_fraction_check_still_fails_on_a_real_mismatch(tmp_path):
    """On the same 42 images: a split made with 0.4 / 0.4 judged as 0.2 / 0.2, and a split with
    every image in training, fail the fraction checks."""
    from pipelines.split import split_patients
    from validation import validate_splits

    manifest = small_manifest()
    wrong = split_patients(manifest, 0.4, 0.4, 0, seed=0).splits
    result = validate_splits(manifest, wrong, tmp_path / "validation", test_frac=0.2, val_frac=0.2)
    assert [o.name.split(",")[0] for o in result.table_failures] == ["expect_column_mean_to_be_between(test fraction"]  # 0.405 of 0.2
    all_train = wrong.assign(split="train")
    result = validate_splits(manifest, all_train, tmp_path / "validation", test_frac=0.2, val_frac=0.2)
    names = {o.name.split(",")[0] for o in result.table_failures}
    assert names == {"expect_column_mean_to_be_between(train fraction", "expect_column_mean_to_be_between(val fraction", "expect_column_mean_to_be_between(test fraction"}
