"""The manifest and quarantine tables of the data contract (the README's run-directory table; docs/architecture.md), and their I/O."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.atomic import staged_file
from pipelines.errors import CxrError
from pipelines.labels import FINDINGS

ID_COLUMNS = ("image_id", "path", "patient_id")
META_COLUMNS = ("study", "age", "sex", "view")
MANIFEST_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, *META_COLUMNS, *FINDINGS, "source")
OPTIONAL_COLUMNS: tuple[str, ...] = ("cohort",)  # kept, as text, when a source or `ingest --cohort(s)` provides it

QUARANTINE_COLUMNS: tuple[str, ...] = ("stage", "reason", "image_id", "row", "record")


class ContractError(CxrError, ValueError):
    """A table does not have the shape the data contract promises (a table-level failure)."""


def conform_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the manifest columns (and the optional ones it has), in order,
    with the contract's dtypes."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ContractError(f"manifest is missing column(s): {', '.join(missing)}")
    optional = [c for c in OPTIONAL_COLUMNS if c in df.columns]
    out = df.loc[:, [*MANIFEST_COLUMNS, *optional]].copy()
    for col in ("image_id", "path", "patient_id", "sex", "view", "source", *optional):
        out[col] = out[col].astype("string")
    out["study"] = pd.to_numeric(out["study"], errors="coerce").astype("Int32")
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype("Int16")
    for f in FINDINGS:
        out[f] = out[f].astype(np.int8)
    return out.reset_index(drop=True)


def empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="string" if c != "row" else "Int64") for c in QUARANTINE_COLUMNS})


def quarantine_records(
    stage: str, reasons: list[str], image_ids: list, rows: list, records: list[dict]
) -> pd.DataFrame:
    """Build quarantine rows; ``records`` are the raw inputs, kept as JSON so nothing is lost."""
    if not reasons:
        return empty_quarantine()
    df = pd.DataFrame(
        {
            "stage": stage,
            "reason": reasons,
            "image_id": image_ids,
            "row": rows,
            "record": [json.dumps(r, default=str, ensure_ascii=False) for r in records],
        }
    )
    df["row"] = pd.array(df["row"], dtype="Int64")
    for c in ("stage", "reason", "image_id", "record"):
        df[c] = df[c].astype("string")
    return df


def read_table(path: Path, what: str, hint: str) -> pd.DataFrame:
    """Read a Parquet table of the run directory, or fail saying which stage makes it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} not found at {path}: {hint}")
    return pd.read_parquet(path)


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write atomically, so an interrupted stage never leaves half a table behind."""
    with staged_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def replace_stage_quarantine(path: Path, stage: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Put ``rows`` into the quarantine file as the records of ``stage``, replacing that stage's
    earlier records so re-running a stage does not double-count."""
    path = Path(path)
    existing = pd.read_parquet(path) if path.exists() else empty_quarantine()
    kept = existing[existing["stage"] != stage]
    parts = [p for p in (kept, rows) if len(p)]
    merged = pd.concat(parts, ignore_index=True) if parts else empty_quarantine()
    write_table(merged, path)
    return merged
