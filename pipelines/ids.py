"""One spelling per identifier: what ingest writes and what the split and its audit compare.

Spreadsheets and pandas change how an id is written without changing the id: a numeric column with
one blank cell is read as floats, so ``766`` comes back as ``766.0``; a hand-edited cell gains a
space. Compared as text, ``766.0`` and ``766`` are two patients, and a patient-level split puts
them in two splits. :func:`normalize_id` maps every such spelling to one: surrounding whitespace
removed, an integral decimal (``766.0``, ``766.000``) written as the integer's digits (``766``).
Leading zeros are kept (``00766`` is the id as written; NIH's zero padding is its adapter's job),
and anything else (``p-766``, ``7.5``, ``1e3``) is kept as written.
"""
from __future__ import annotations

import re

import pandas as pd

_INTEGRAL_DECIMAL = re.compile(r"^(\d+)\.0+$")


def normalize_id(value: object) -> str | None:
    """The id's one spelling, or None for a blank (None, NaN, empty or whitespace-only)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    if not text:
        return None
    match = _INTEGRAL_DECIMAL.match(text)
    return match.group(1) if match else text


def normalize_ids(values: pd.Series) -> pd.Series:
    """:func:`normalize_id` over a column, as a pandas ``string`` column (blanks become <NA>)."""
    text = values.astype("string").str.strip()
    text = text.str.replace(_INTEGRAL_DECIMAL, r"\1", regex=True)
    return text.mask(text == "")


class IdNormalizer:
    """Normalizes ids as an adapter reads them and counts, per column, the values whose spelling
    changed (with the first example), for the ingest summary."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, tuple[str, str]] = {}

    def __call__(self, column: str, raw: object) -> str | None:
        value = normalize_id(raw)
        if value is not None and value != raw:
            self.counts[column] = self.counts.get(column, 0) + 1
            self.examples.setdefault(column, (str(raw), value))
        return value
