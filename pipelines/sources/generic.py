"""A plain manifest (CSV or Parquet) already in cxr's column names, for any other collection."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.labels import FINDINGS, LABEL_VALUES
from pipelines.manifest import OPTIONAL_COLUMNS, ContractError
from pipelines.sources.base import ParsedSource, Reject, first_reject, manifest_row, normalize_sex, parse_age, parse_study, read_label_file, rows_frame

GENERIC_REQUIRED = ("image_id", "path", "patient_id")
OPTIONAL = ("study", "age", "sex", "view", "source", *OPTIONAL_COLUMNS)
# Where the labels come from and how far to trust them (the model card's "training data").
LABEL_NOTE = "as supplied in the manifest: their origin and accuracy are whatever its maker says (not recorded by cxr)"


def _read(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]], list[Reject]]:
    if path.suffix != ".parquet":
        return read_label_file(path, GENERIC_REQUIRED)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    frame = pd.read_parquet(path)
    missing = [c for c in GENERIC_REQUIRED if c not in frame.columns]
    if missing:
        raise ContractError(f"{path} is missing required column(s) {', '.join(missing)}")
    text = frame.astype("string").fillna("")
    return list(frame.columns), list(enumerate(text.to_dict("records"), start=1)), []


def _label(text: str) -> int | None:
    t = text.strip() or "0"
    try:
        value = float(t)
    except ValueError:
        return None
    return int(value) if value in LABEL_VALUES else None


def parse_manifest(csv_path: Path) -> ParsedSource:
    header, good, rejects = _read(Path(csv_path))
    parsed = ParsedSource(rows=rows_frame([]), rejects=rejects, rows_in=len(good) + len(rejects))
    normalize = parsed.normalized
    present = [f for f in FINDINGS if f in header]
    if not present:
        raise ContractError(f"{csv_path} has none of the finding columns {', '.join(FINDINGS)}")
    notes = []
    extra = [c for c in header if c not in {*GENERIC_REQUIRED, *OPTIONAL, *FINDINGS}]
    if extra:
        notes.append(f"ignored column(s) not in the data contract: {', '.join(extra)}")
    if len(present) < len(FINDINGS):
        notes.append(f"finding column(s) absent, recorded as 0: {', '.join(f for f in FINDINGS if f not in present)}")
    optional = tuple(c for c in OPTIONAL_COLUMNS if c in header)
    out: list[dict] = []
    for number, rec in good:
        image_id = normalize("image_id", rec["image_id"])
        path = rec["path"].strip() or None
        values = {f: _label(rec.get(f, "")) for f in FINDINGS}
        bad = [f for f in present if values[f] is None]
        if bad:
            reason = "unknown label value(s) " + ", ".join(f"{f}={rec[f]!r}" for f in bad)
            rejects.append(Reject(number, reason, rec, image_id, kind="unknown label value(s)", column=bad[0], value=rec[bad[0]], path=path))
            continue
        age, age_problem = parse_age(rec.get("age"))
        study, study_problem = parse_study(rec.get("study"))
        if reject := first_reject(number, rec, image_id, path, ("age", age_problem), ("study", study_problem)):
            rejects.append(reject)
            continue
        out.append(manifest_row(
            number, rec, image_id, path,
            patient_id=normalize("patient_id", rec["patient_id"]),
            study=study,
            age=age,
            sex=normalize_sex(rec.get("sex")),
            view=(rec.get("view") or "").strip().upper() or "UNKNOWN",
            **values,
            source=(rec.get("source") or "").strip() or "manifest",
            **{c: (rec.get(c) or "").strip() or None for c in optional},
        ))
    parsed.notes = notes
    parsed.rows = rows_frame(out, optional)
    return parsed
