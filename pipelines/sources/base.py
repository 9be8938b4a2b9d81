"""Shared pieces of the source adapters: reading a label file row by row, and rejects."""
from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.manifest import MANIFEST_COLUMNS, ContractError


@dataclass
class Reject:
    """A record an adapter could not turn into a manifest row. ``row`` is the 1-based data row."""

    row: int
    reason: str
    record: dict
    image_id: str | None = None


@dataclass
class ParsedSource:
    rows: pd.DataFrame  # manifest columns + "row" (1-based data row in the label file)
    rejects: list[Reject] = field(default_factory=list)
    rows_in: int = 0
    notes: list[str] = field(default_factory=list)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_label_file(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]], list[Reject]]:
    """Read a CSV label file keeping every row accountable.

    Returns the header, the well-formed rows as (row number, {column: text}), and a Reject for every row
    whose field count does not match the header. A missing required column is a table-level
    ContractError. Empty trailing header names (a trailing comma) are dropped with their fields.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label file not found: {path}")
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ContractError(f"{path} is empty: expected a header row") from None
        while header and header[-1].strip() == "":
            header = header[:-1]
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise ContractError(
                f"{path} is missing required column(s) {', '.join(repr(m) for m in missing)}; "
                f"found {header}"
            )
        good: list[tuple[int, dict[str, str]]] = []
        rejects: list[Reject] = []
        width = len(header)
        for number, fields in enumerate(reader, start=1):
            if not fields or all(f.strip() == "" for f in fields):
                continue  # blank line: not a record
            if len(fields) > width and all(f.strip() == "" for f in fields[width:]):
                fields = fields[:width]
            if len(fields) != width:
                rejects.append(
                    Reject(
                        number,
                        f"malformed row: {len(fields)} fields, header has {width}",
                        {"raw": ",".join(fields)},
                    )
                )
                continue
            good.append((number, dict(zip(header, fields))))
    return header, good, rejects


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """Adapter output rows as a DataFrame with the manifest columns, ``row`` and ``record``."""
    return pd.DataFrame(rows, columns=["row", *MANIFEST_COLUMNS, "record"])


def blank(text: str | None) -> bool:
    return text is None or str(text).strip() == ""


def parse_age(text: str | None) -> tuple[int | None, str | None]:
    """Ages come as ``58`` or ``058Y`` (older NIH files). Returns (age, error)."""
    if blank(text):
        return None, None
    t = str(text).strip().upper()
    if t.endswith("Y"):
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        return None, f"unparseable age {text!r}"
    if value != int(value):
        return int(round(value)), None
    return int(value), None


def normalize_sex(text: str | None) -> str:
    """Map common spellings to M/F/U; anything else is kept (uppercased) for validation to judge."""
    if blank(text):
        return "U"
    t = str(text).strip().upper()
    return {"MALE": "M", "FEMALE": "F", "UNKNOWN": "U", "O": "U"}.get(t, t)
