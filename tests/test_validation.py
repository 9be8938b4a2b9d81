"""The GX validation suites on tiny hand-made tables: each planted fault fails exactly its
expectation with exactly its rows; table-level failures stop, record-level ones quarantine."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.labels import FINDINGS
from pipelines.manifest import QUARANTINE_COLUMNS, conform_manifest
from validation import (
    ValidationFailed,
    drop_failed,
    format_summary,
    image_checks,
    quarantine_from,
    raise_on_table_failures,
    validate_images,
    validate_manifest,
    validate_splits,
    write_summary,
)

UNIQUE = "expect_column_values_to_be_unique(image_id)"
AGE = "expect_column_values_to_be_between(age, 0..120)"
VIEW = "expect_column_values_to_be_in_set(view, {PA, AP, LL, LATERAL, UNKNOWN})"
SEX = "expect_column_values_to_be_in_set(sex, {M, F, U})"
PATIENT_NULL = "expect_column_values_to_not_be_null(patient_id)"
PATH_NULL = "expect_column_values_to_not_be_null(path)"
HERNIA = "expect_column_values_to_be_in_set(Hernia, {1, 0, -1})"
NAME = r"expect_column_values_to_match_regex(image_id, ^\d{8}_\d{3}\.png$)"
AGREES = "expect_column_pair_values_to_be_equal(nih image_id patient part, patient_id)"
LEAK = "expect_column_values_to_be_unique(patient_id over one row per patient and split: no patient in two splits)"


def manifest_frame(patients: int = 6, per_patient: int = 2, source: str = "nih") -> pd.DataFrame:
    rows = []
    for p in range(1, patients + 1):
        for k in range(per_patient):
            image_id = f"{p:08d}_{k:03d}.png"
            labels = {f: int((p + k + i) % 5 == 0) for i, f in enumerate(FINDINGS)}
            rows.append({"image_id": image_id, "path": image_id, "patient_id": f"{p:08d}", "study": k, "age": 30 + p,
                         "sex": "MF"[p % 2], "view": ("PA", "AP")[k % 2], **labels, "source": source})
    return conform_manifest(pd.DataFrame(rows))


def failing(result) -> set[str]:
    return {o.name for o in result.outcomes if not o.success}


def page_text(result) -> str:
    return html.unescape(result.page_path.read_text())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("validation")


@pytest.fixture(scope="module")
def faulty(out):
    """A manifest with one planted fault per row (rows 4 and 5 share an id), and its result."""
    m = manifest_frame()
    m = pd.concat([m.iloc[:5], m.iloc[[4]], m.iloc[6:]], ignore_index=True)  # row 5 repeats row 4
    m.loc[1, "age"] = 412
    m.loc[2, "view"] = "XX"
    m.loc[3, "patient_id"] = pd.NA
    m.loc[6, "patient_id"] = "00000099"
    m.loc[7, "sex"] = "X"
    m.loc[8, "Hernia"] = 2
    m.loc[9, ["image_id", "path"]] = "scan9.png"
    m.loc[10, "path"] = pd.NA
    return m, validate_manifest(m, out, source="nih")


PLANTED = {1: [AGE], 2: [VIEW], 3: [PATIENT_NULL], 4: [UNIQUE], 5: [UNIQUE], 6: [AGREES], 7: [SEX], 8: [HERNIA], 9: [NAME], 10: [PATH_NULL]}


def test_clean_manifest_passes(out):
    result = validate_manifest(manifest_frame(), out, source="nih")
    assert result.success, format_summary([result])
    assert result.failed_rows == {} and result.table_failures == [] and result.rows == 12
    assert result.docs_path == out.resolve() / "data_docs" / "index.html" and result.docs_path.exists()


def test_each_planted_fault_fails_exactly_its_expectation_and_rows(faulty):
    _, result = faulty
    assert failing(result) == {n for names in PLANTED.values() for n in names}
    assert result.failed_rows == PLANTED
    assert result.table_failures == []
    by_name = {o.name: o for o in result.outcomes}
    assert by_name[UNIQUE].unexpected_count == 2 and "00000003_000.png" in by_name[UNIQUE].detail
    assert by_name[AGE].unexpected_count == 1 and "412" in by_name[AGE].detail


def test_quarantine_takes_failing_rows_with_expectation_names(faulty):
    m, result = faulty
    q = quarantine_from(result, m, stage="validate-manifest")
    assert list(q.columns) == list(QUARANTINE_COLUMNS)
    assert q["row"].tolist() == sorted(PLANTED) and set(q["stage"]) == {"validate-manifest"}
    assert dict(zip(q["row"], q["reason"])) == {r: "; ".join(n) for r, n in PLANTED.items()}
    assert json.loads(q.set_index("row").at[1, "record"])["age"] == 412
    assert json.loads(q.set_index("row").at[3, "record"])["patient_id"] is None
    clean = drop_failed(result, m)
    assert len(clean) + len(q) == len(m) and not clean["image_id"].isin(q["image_id"].dropna()).any()


def test_data_docs_show_the_failing_expectations(faulty):
    _, result = faulty
    assert result.page_path.exists() and result.page_path.is_relative_to(result.docs_path.parent)
    text = page_text(result)
    for name in failing(result):
        assert name in text
    assert "validations/manifest" in result.docs_path.read_text()


def test_missing_column_is_a_table_failure_that_stops(out):
    result = validate_manifest(manifest_frame().drop(columns="age"), out, source="nih")
    names = {o.name for o in result.table_failures}
    assert "expect_table_columns_to_match_set(data contract columns)" in names
    assert "expect_column_values_to_be_of_type(age, int16)" in names
    assert result.failed_rows == {}
    with pytest.raises(ValidationFailed, match=r"expect_table_columns_to_match_set\(data contract columns\)") as err:
        raise_on_table_failures([result])
    assert str(result.page_path) in str(err.value)
    assert raise_on_table_failures([result], warn_only=True)


def test_wrong_dtype_is_a_table_failure(out):
    m = manifest_frame()
    m["age"] = m["age"].astype("float64")
    result = validate_manifest(m, out, source="nih")
    assert {o.name for o in result.table_failures} == {"expect_column_values_to_be_of_type(age, int16)"}


def test_naming_rules_apply_only_to_their_source(out):
    nih, other = manifest_frame(2), manifest_frame(2, source="chexpert")
    other["image_id"] = other["path"] = [f"patient{i}/study1/view1_frontal.jpg" for i in range(len(other))]
    result = validate_manifest(pd.concat([nih, other], ignore_index=True), out)
    assert result.success, format_summary([result])
    assert NAME in {o.name for o in result.outcomes}


def test_every_image_file_has_a_row(out):
    m = manifest_frame(2)
    result = validate_manifest(m, out, source="nih", image_paths=[*m["path"], "00000777_000.png"])
    (flag,) = result.flags
    assert flag.name == "expect_column_pair_values_to_be_equal(image file, manifest path: every image has a row)"
    assert flag.unexpected_count == 1 and "00000777_000.png" in flag.detail
    assert result.table_failures == [] and result.failed_rows == {}


def splits_for(m: pd.DataFrame, test: set[int], val: set[int]) -> pd.DataFrame:
    patient = m["patient_id"].astype(int)
    split = np.where(patient.isin(test), "test", np.where(patient.isin(val), "val", "train"))
    return pd.DataFrame({"image_id": m["image_id"], "patient_id": m["patient_id"], "split": split})


@pytest.fixture(scope="module")
def split_data():
    m = manifest_frame(patients=20)  # 40 images: 4 test patients = 0.2, 2 val patients = 0.1
    return m, splits_for(m, test={1, 2, 3, 4}, val={5, 6})


def test_patient_disjoint_split_passes(out, split_data):
    m, splits = split_data
    result = validate_splits(m, splits, out, test_frac=0.2, val_frac=0.1)
    assert result.table_failures == [], format_summary([result])
    raise_on_table_failures([result])
    positives = {row["split"]: row for row in result.tables["positives_per_split"]}
    assert sum(r["images"] for r in positives.values()) == 40
    assert positives["test"]["Atelectasis"] == int(m.loc[splits["split"] == "test", "Atelectasis"].sum())


def test_leaky_split_fails_and_stops_the_pipeline(out, split_data):
    m, splits = split_data
    leaky = splits.copy()
    leaky.loc[leaky["image_id"] == "00000010_001.png", "split"] = "test"  # patient 10: train and test
    result = validate_splits(m, leaky, out, test_frac=0.2, val_frac=0.1)
    assert [o.name for o in result.table_failures] == [LEAK]
    assert "00000010" in result.table_failures[0].detail
    with pytest.raises(ValidationFailed, match="no patient in two splits"):
        raise_on_table_failures([result])
    assert len(raise_on_table_failures([result], warn_only=True)) == 1
    assert LEAK in page_text(result)
    assert "table-level failure, the pipeline stops" in format_summary([result])


def test_incomplete_split_with_wrong_fractions_fails(out, split_data):
    m, splits = split_data
    bad = pd.concat([splits.iloc[1:], pd.DataFrame({"image_id": ["stray.png"], "patient_id": ["00000099"], "split": ["train"]})])
    result = validate_splits(m, bad, out, test_frac=0.5, val_frac=0.1)
    assert {o.name for o in result.table_failures} == {
        "expect_column_values_to_not_be_null(split: every manifest image is in a split)",
        "expect_column_values_to_be_in_set(split images are manifest images)",
        "expect_column_mean_to_be_between(train fraction, 0.302..0.498)",  # 0.4 +- two 2-image patients of 41 rows (whole patients)
        "expect_column_mean_to_be_between(test fraction, 0.450..0.550)",
    }


def test_splits_without_their_columns_fail_at_table_level(out, split_data):
    m, splits = split_data
    result = validate_splits(m, splits.drop(columns="split"), out, test_frac=0.2, val_frac=0.1)
    assert [o.name for o in result.table_failures] == ["expect_table_columns_to_match_set(image_id, patient_id, split)"]


def image_table() -> pd.DataFrame:
    """good, blank, constant, saturated, upsampled (but otherwise good), undecodable."""
    return pd.DataFrame(
        {
            "image_id": ["good", "blank", "constant", "saturated", "small", "broken"],
            "decoded": [True, True, True, True, True, False],
            "error": [None, None, None, None, None, "corrupt image data"],
            "orig_width": [1024, 1024, 1024, 1024, 64, None],
            "orig_height": [1024, 1024, 1024, 1024, 64, None],
            "orig_mode": ["L", "L", "L", "L", "L", None],
            "pixel_mean": [120.0, 3.0, 128.0, 127.5, 118.0, np.nan],
            "pixel_std": [40.0, 3.0, 0.0, 127.5, 35.0, np.nan],
            "clipped_frac": [0.01, 0.4, 0.0, 1.0, 0.02, np.nan],
        }
    )


def test_image_suite_flags_blank_constant_saturated_upsampled(out):
    images = image_table()
    result = validate_images(images, out, image_size=128)
    assert result.failed_rows == {
        1: ["expect_column_values_to_be_between(pixel_mean, 10..245: not blank)"],
        2: ["expect_column_values_to_be_between(pixel_std, >= 2: not constant)"],
        3: ["expect_column_values_to_be_between(clipped_frac, <= 0.5: not saturated)"],
        5: ["expect_column_values_to_be_in_set(decoded: the file is a readable image)"],
    }
    (flag,) = result.flags
    assert flag.name == "expect_column_values_to_be_between(shorter side, >= 128: else upsampled)" and flag.unexpected_count == 1
    assert result.table_failures == []
    q = quarantine_from(result, images, stage="preprocess")
    assert q["image_id"].tolist() == ["blank", "constant", "saturated", "broken"]


def test_batch_flags_use_the_suite_thresholds():
    batch = {c: image_table()[c].to_numpy() for c in image_table().columns}
    flags = image_checks(batch, image_size=128)
    assert flags["is_blank"].tolist() == [False, True, False, False, False, False]
    assert flags["is_constant"].tolist() == [False, False, True, False, False, False]
    assert flags["is_saturated"].tolist() == [False, False, False, True, False, False]
    assert flags["upsampled"].tolist() == [False, False, False, False, True, False]
    assert flags["image_id"] is batch["image_id"]


def test_summary_merges_suites_and_counts_failures(out, faulty, split_data):
    _, manifest_result = faulty
    m, splits = split_data
    path = write_summary([manifest_result], out)
    write_summary([validate_splits(m, splits, out, test_frac=0.2, val_frac=0.1)], out)
    summary = json.loads(path.read_text())
    assert set(summary["suites"]) == {"manifest", "splits"} and summary["success"] is False
    assert summary["status"] == "failed"
    manifest = summary["suites"]["manifest"]
    assert manifest["success"] is False and manifest["status"] == "failed" and manifest["failed_records"] == len(PLANTED)
    by_name = {e["name"]: e for e in manifest["expectations"]}
    assert by_name[UNIQUE]["success"] is False and by_name[UNIQUE]["unexpected_count"] == 2 and by_name[UNIQUE]["level"] == "record"
    assert by_name["expect_table_row_count_to_be_between(>= 1 row)"]["success"] is True
    assert Path(manifest["report_page"]).exists()
    text = format_summary([manifest_result])
    assert re.search(r"manifest: failed, 9 of \d+ expectations \(0 table-level, 9 record-level, 0 flags\); "
                     r"10 of 12 records quarantined -- the rest go on\n", text)
    assert f"[record] {UNIQUE}: 2 records" in text and str(manifest_result.page_path) in text


def test_three_levels_flags_only_is_passed_with_warnings(out, split_data):
    """A split whose only failures are flags (findings without positives in a split) passed with
    warnings: success, nothing stops, and summary.json, the CLI and the Data Docs say so."""
    from validation.report import overall_line

    m, splits = split_data
    result = validate_splits(m, splits, out / "levels", test_frac=0.2, val_frac=0.1)
    n = len(result.flags)
    assert n > 0 and result.table_failures == [] and result.record_failures == []
    assert result.success and result.status == "passed with warnings" and result.warnings == n
    assert raise_on_table_failures([result]) == []
    text = format_summary([result])
    first, *rest = text.splitlines()
    assert first.startswith(f"splits: passed with {n} warnings (") and "flag-level" in first
    (note,) = [line for line in rest if line.startswith("  warnings: ")]
    assert f"{n} (finding, split) pairs have no positive image" in note and "change nothing" in note
    summary = json.loads(write_summary([result], out / "levels").read_text())
    entry = summary["suites"]["splits"]
    assert (entry["status"], entry["success"], entry["warnings"]) == ("passed with warnings", True, n)
    assert "(finding, split) pairs" in entry["warnings_note"]
    assert (summary["status"], summary["success"], summary["warnings"]) == ("passed with warnings", True, n)
    assert overall_line(summary).startswith(f"data validation: passed with {n} warnings (splits passed with {n} warnings)")
    page = page_text(result)
    assert f"passed with {n} warnings" in page and "Warnings are flag-level checks" in page
    index = html.unescape(result.docs_path.read_text())
    assert f"passed with {n} warnings" in index and "passed with N warnings, only flag-level checks failed" in index


def test_three_levels_a_real_failure_still_fails(out, split_data):
    m, splits = split_data
    leaky = splits.copy()
    leaky.loc[leaky["image_id"] == "00000010_001.png", "split"] = "test"
    result = validate_splits(m, leaky, out / "levels-fail", test_frac=0.2, val_frac=0.1)
    assert result.flags and not result.success and result.status == "failed"
    assert format_summary([result]).startswith("splits: failed, ")
    summary = json.loads(write_summary([result], out / "levels-fail").read_text())
    assert (summary["status"], summary["success"]) == ("failed", False)
    assert "Status: failed" in re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page_text(result)))
    bad_age = manifest_frame()
    bad_age.loc[0, "age"] = 412
    record = validate_manifest(bad_age, out / "levels-fail", source="nih")
    assert record.status == "failed" and not record.success and record.failed_rows == {0: [AGE]}
    assert "records quarantined -- the rest go on" in format_summary([record])


def test_summary_status_of_entries_written_before_the_levels():
    from validation.report import overall, suite_status

    flags_only = {"success": False, "expectations": [{"level": "flag", "success": False}, {"level": "table", "success": True}]}
    record = {"success": False, "expectations": [{"level": "record", "success": False}]}
    assert suite_status(flags_only) == ("passed with warnings", 1)
    assert suite_status(record) == ("failed", 0)
    assert suite_status({"success": True}) == ("passed", 0)
    assert overall({"suites": {"a": {"success": True}, "b": flags_only}}) == {
        "status": "passed with warnings", "success": True, "warnings": 1}
