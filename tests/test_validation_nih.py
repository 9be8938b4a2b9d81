"""The manifest suite on the real NIH subset: it passes on the present images, and a copy of the
real label file with five planted faults fails exactly those expectations and quarantines exactly
those rows."""
from __future__ import annotations

import csv
import gzip
import html
from pathlib import Path

import pandas as pd
import pytest

from pipelines.ingest import ingest
from validation import drop_failed, format_summary, quarantine_from, validate_manifest

pytestmark = pytest.mark.realdata

PRESENT = 1301
PLANTED = {
    "duplicate": "expect_column_values_to_be_unique(image_id)",
    "age": "expect_column_values_to_be_between(age, 0..120)",
    "view": "expect_column_values_to_be_in_set(view, {PA, AP, LL, LATERAL, UNKNOWN})",
    "null patient": "expect_column_values_to_not_be_null(patient_id)",
    "patient disagrees": "expect_column_pair_values_to_be_equal(nih image_id patient part, patient_id)",
}


@pytest.fixture(scope="module")
def label_rows(nih) -> tuple[list[str], list[list[str]]]:
    """The real label file's header and the rows of the images present on disk (the rest would
    only be quarantined by ingest as missing files)."""
    present = {p.name for p in (nih / "images").iterdir()}
    with gzip.open(nih / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for r in reader if r and r[0] in present]
    assert len(rows) == PRESENT
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_manifest_suite_passes_on_the_present_images(nih, label_rows, tmp_path):
    header, rows = label_rows
    result = ingest("nih", write_csv(tmp_path / "labels.csv", header, rows), nih / "images")
    assert len(result.manifest) == PRESENT and len(result.quarantine) == 0
    files = [p.name for p in (nih / "images").iterdir()]
    suite = validate_manifest(result.manifest, tmp_path / "validation", source="nih", image_paths=files)
    assert suite.success, format_summary([suite])
    assert suite.rows == PRESENT and suite.failed_rows == {}


def test_planted_faults_fail_exactly_their_expectations_and_rows(nih, label_rows, tmp_path):
    header, rows = label_rows
    col = {name: i for i, name in enumerate(header)}
    rows = [list(r) for r in rows]
    targets = {fault: rows[i][0] for i, fault in enumerate(PLANTED)}
    rows.append(list(rows[0]))  # the same image id twice: both rows are suspect
    rows[1][col["Patient Age"]] = "412"
    rows[2][col["View Position"]] = "XX"
    rows[3][col["Patient ID"]] = ""
    assert rows[4][col["Patient ID"]] != "99999"
    rows[4][col["Patient ID"]] = "99999"  # image name says another patient
    result = ingest("nih", write_csv(tmp_path / "labels_faulty.csv", header, rows), nih / "images")
    # Ingest itself rejects what the label file shows on its own, naming the rows: one file listed
    # twice (both rows) and an age outside 0..120. The manifest suite sees the other three.
    assert len(result.manifest) == PRESENT - 2 and len(result.quarantine) == 3
    reasons = dict(zip(result.quarantine["row"], result.quarantine["reason"]))
    assert reasons[1] == reasons[PRESENT + 1] and reasons[1].startswith(f"duplicate file: rows 1, {PRESENT + 1} resolve to the same file {targets['duplicate']!r}")
    assert reasons[2] == "row 2: Patient Age '412' is outside 0..120"
    suite = validate_manifest(result.manifest, tmp_path / "from_ingest", source="nih")
    assert {o.name for o in suite.outcomes if not o.success} == {PLANTED[f] for f in ("view", "null patient", "patient disagrees")}

    # A manifest made elsewhere has not been through ingest: all five faults reach the suite.
    clean = ingest("nih", write_csv(tmp_path / "labels.csv", header, label_rows[1]), nih / "images").manifest
    at = {fault: clean.index[clean["image_id"] == image_id][0] for fault, image_id in targets.items()}
    manifest = clean.copy()
    manifest.loc[at["age"], "age"] = 412
    manifest.loc[at["view"], "view"] = "XX"
    manifest.loc[at["null patient"], "patient_id"] = None
    manifest.loc[at["patient disagrees"], "patient_id"] = "00099999"
    manifest = pd.concat([manifest, manifest.loc[[at["duplicate"]]]], ignore_index=True)
    out = tmp_path / "validation"
    suite = validate_manifest(manifest, out, source="nih")
    assert {o.name for o in suite.outcomes if not o.success} == set(PLANTED.values())
    assert suite.table_failures == []

    quarantine = quarantine_from(suite, manifest, stage="validate-manifest")
    expected = [(targets["duplicate"], PLANTED["duplicate"])] * 2 + [(targets[f], PLANTED[f]) for f in list(PLANTED)[1:]]
    assert sorted(zip(quarantine["image_id"], quarantine["reason"])) == sorted(expected)
    kept = drop_failed(suite, manifest)
    assert len(kept) == PRESENT + 1 - 6 and not kept["image_id"].isin(targets.values()).any()

    page = html.unescape(suite.page_path.read_text())
    assert all(name in page for name in PLANTED.values())
