"""Shared pieces of the source adapters: reading a label file row by row, parsing its values, and
rejects."""
from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.ids import IdNormalizer
from pipelines.manifest import MANIFEST_COLUMNS, ContractError

AGE_RANGE = (0, 120)  # years; the manifest suite checks the same range (validation/manifest_suite.py)
STUDY_RANGE = (0, 2**31 - 1)  # the manifest's ``study`` is Int32


@dataclass
class Reject:
    """A record an adapter could not turn into a manifest row. ``row`` is the 1-based data row.

    ``kind`` groups rejects with the same cause (``age outside 0..120``) for the summary and the
    mass-rejection guard; ``column`` and ``value`` say where and what (the guard quotes them);
    ``path`` is the image path the row lists, where it has one (a row whose image is absent on disk
    does not count towards the guard: a partial download is not a bad column)."""

    row: int
    reason: str
    record: dict
    image_id: str | None = None
    kind: str | None = None
    column: str | None = None
    value: object = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind is None:  # "unknown label(s) 'Dragon'" -> "unknown label(s)"
            self.kind = self.reason.split(":")[0].split(" '")[0]


@dataclass
class ParsedSource:
    rows: pd.DataFrame  # manifest columns + "row" (1-based data row in the label file)
    rejects: list[Reject] = field(default_factory=list)
    rows_in: int = 0
    notes: list[str] = field(default_factory=list)
    normalized: IdNormalizer = field(default_factory=IdNormalizer)  # ids whose spelling ingest changed


@dataclass(frozen=True)
class Problem:
    """Why one value cannot go into the manifest: ``kind`` for grouping, ``text`` for the reason."""

    kind: str
    text: str


def value_reject(number: int, column: str, problem: Problem, rec: dict, image_id: str | None, path: str | None) -> Reject:
    """A Reject for one bad value, its reason naming the row, the column and the value."""
    return Reject(number, f"row {number}: {column} {problem.text}", rec, image_id, kind=problem.kind, column=column, value=rec.get(column), path=path)


def first_reject(number: int, rec: dict, image_id: str | None, path: str | None,
                 *checks: tuple[str, Problem | None]) -> Reject | None:
    """The record's reject for the first ``(column, problem)`` that has a problem; None when every
    value could be read (e.g. ``("Patient Age", age_problem), ("Follow-up #", study_problem)``)."""
    for column, problem in checks:
        if problem:
            return value_reject(number, column, problem, rec, image_id, path=path)
    return None


def manifest_row(number: int, rec: dict, image_id: str | None, path: str | None, **columns) -> dict:
    """One adapter output row: ``row`` (the label file's data row), ``image_id``, ``path``, the
    manifest ``columns`` the source gives, and the raw ``record``."""
    return {"row": number, "image_id": image_id, "path": path, **columns, "record": rec}


def _decode(data: bytes, path: Path) -> str:
    """The label file's text. A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped; text that
    is not UTF-8 (a Latin-1 or Windows-1252 export) is a table-level error naming the file, the
    byte offset and the line, not a guess: a wrong guess would silently change ids and paths."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ContractError(f"{path} is UTF-16 text (Excel's 'Unicode Text'); save it as CSV UTF-8 (comma-separated)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        where = "of the decompressed text " if path.suffix == ".gz" else ""
        raise ContractError(
            f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} {where}(line {line}) "
            f"is not valid UTF-8; save the file as UTF-8 (Excel: 'CSV UTF-8') or convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
        ) from None


def _read_text(path: Path) -> str:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
        return _decode(fh.read(), path)


def read_label_file(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]], list[Reject]]:
    """Read a CSV label file keeping every row accountable.

    Returns the header, the well-formed rows as (row number, {column: text}), and a Reject for every row
    whose field count does not match the header. A missing required column is a table-level
    ContractError. Empty trailing header names (a trailing comma) are dropped with their fields.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label file not found: {path}")
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
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
                    kind="malformed row",
                )
            )
            continue
        good.append((number, dict(zip(header, fields))))
    return header, good, rejects


def rows_frame(rows: list[dict], optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """Adapter output rows as a DataFrame with the manifest columns, the ``optional`` ones the
    source has, ``row`` and ``record``."""
    return pd.DataFrame(rows, columns=["row", *MANIFEST_COLUMNS, *optional, "record"])


def blank(text: str | None) -> bool:
    return text is None or str(text).strip() == ""


def parse_whole_number(text: str | None, what: str, bounds: tuple[int, int], shown: str | None = None) -> tuple[int | None, Problem | None]:
    """A count written as ``12`` or ``12.0`` (a float column) -> 12. Blank -> (None, None). Text,
    ``nan``, ``inf``, ``12.5`` or a value outside ``bounds`` -> (None, the Problem), quoting
    ``shown`` (the value as the file has it; default ``text``)."""
    if blank(text):
        return None, None
    t = str(text).strip()
    q = repr(str(shown).strip() if shown is not None else t)
    try:
        value = float(t)
    except ValueError:
        return None, Problem(f"{what} not a number", f"{q} is not a number")
    if not math.isfinite(value):
        return None, Problem(f"{what} not a finite number", f"{q} is not a finite number")
    if value != int(value):
        return None, Problem(f"{what} not a whole number", f"{q} is not a whole number")
    low, high = bounds
    if not low <= value <= high:
        return None, Problem(f"{what} outside {low}..{high}", f"{q} is outside {low}..{high}")
    return int(value), None


def parse_age(text: str | None) -> tuple[int | None, Problem | None]:
    """Ages come as ``58``, ``58.0`` (a float column) or ``058Y`` (older NIH files), in years,
    within AGE_RANGE. Returns (age, problem)."""
    t = None if blank(text) else str(text).strip()
    if t and t[-1] in "yY":
        t = t[:-1].strip()
    return parse_whole_number(t, "age", AGE_RANGE, shown=text)


def parse_study(text: str | None) -> tuple[int | None, Problem | None]:
    """A follow-up / study number: ``12`` or ``12.0``, not negative. Returns (study, problem)."""
    return parse_whole_number(text, "study", STUDY_RANGE)


def normalize_sex(text: str | None) -> str:
    """Map common spellings to M/F/U; anything else is kept (uppercased) for validation to judge."""
    if blank(text):
        return "U"
    t = str(text).strip().upper()
    return {"MALE": "M", "FEMALE": "F", "UNKNOWN": "U", "O": "U"}.get(t, t)
