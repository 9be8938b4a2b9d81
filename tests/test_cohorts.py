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
