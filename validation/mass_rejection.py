"""The manifest suite's record-level failures as the mass-rejection guard reads them
(pipelines/reject_guard.py): one Rejection per failed row and check, the check's name as the reason."""
from __future__ import annotations

import pandas as pd

from pipelines.reject_guard import Rejection
from validation.results import SuiteResult


def _where(table: pd.DataFrame, position: int) -> str:
    """``row 17`` (the label file's data row) where the table has one, else the manifest row."""
    if "row" in table and not pd.isna(table.at[position, "row"]):
        return f"row {int(table.at[position, 'row'])}"
    image = f" ({table.at[position, 'image_id']})" if "image_id" in table else ""
    return f"manifest row {position + 1}{image}"


def _value(table: pd.DataFrame, position: int, column: str | None) -> object:
    """The checked value; for a check on a derived column (the patient part of an NIH image id),
    the image id it was derived from."""
    if column is None:
        return None
    if column not in table:
        column = "image_id" if "image_id" in table else None
    if column is None:
        return None
    value = table.at[position, column]
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value  # numpy scalars quote as plain numbers


def suite_rejections(result: SuiteResult, table: pd.DataFrame) -> list[Rejection]:
    """``table`` is the table ``result`` validated (positions are its rows)."""
    table = table.reset_index(drop=True)
    columns = {o.name: o.column for o in result.outcomes}
    return [
        Rejection(name, columns.get(name), _where(table, p), _value(table, p, columns.get(name)))
        for p, names in sorted(result.failed_rows.items())
        for name in names
    ]
