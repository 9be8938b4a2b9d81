"""Turn record-level failures into quarantine rows, and the table into its clean remainder."""
from __future__ import annotations

import pandas as pd

from pipelines.manifest import quarantine_records
from validation.results import SuiteResult


def _records(table: pd.DataFrame, positions: list[int]) -> list[dict]:
    """Rows as plain dicts (nulls as None), so the JSON in quarantine.parquet reads naturally."""
    rows = table.iloc[positions]
    return rows.astype(object).where(rows.notna(), None).to_dict("records")


def quarantine_from(result: SuiteResult, table: pd.DataFrame, stage: str) -> pd.DataFrame:
    """Quarantine rows for every record that failed a record-level check of ``result``; the reason
    names the check(s), e.g. ``expect_column_values_to_be_between(age, 0..120)``. ``table`` is the
    table that was validated; ``row`` is its ``row`` column where it has one (the label file's data
    row), else the position in ``table``."""
    positions = sorted(result.failed_rows)
    table = table.reset_index(drop=True)
    image_ids = table["image_id"].iloc[positions].tolist() if "image_id" in table else [None] * len(positions)
    rows = table["row"].iloc[positions].tolist() if "row" in table else positions
    return quarantine_records(
        stage,
        ["; ".join(result.failed_rows[p]) for p in positions],
        [None if pd.isna(i) else i for i in image_ids],
        rows,
        _records(table, positions),
    )


def drop_failed(result: SuiteResult, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` without the rows quarantine_from quarantines: what continues down the pipeline."""
    table = table.reset_index(drop=True)
    return table.drop(index=list(result.failed_rows)).reset_index(drop=True)
