"""NIH ChestX-ray14 ``Data_Entry_2017*.csv`` (any revision)."""
from __future__ import annotations

from pathlib import Path

from pipelines.labels import UnknownLabelError, parse_nih_labels
from pipelines.sources.base import ParsedSource, Reject, blank, normalize_sex, parse_age, read_label_file, rows_frame

NIH_REQUIRED = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position")


def nih_patient_id(text: str) -> str:
    """NIH writes ``Patient ID`` as a bare integer; image names carry it zero-padded to 8 digits."""
    t = str(text).strip()
    return t.zfill(8) if t.isdigit() else t


def parse_nih(csv_path: Path) -> ParsedSource:
    _, good, rejects = read_label_file(csv_path, NIH_REQUIRED)
    rows_in = len(good) + len(rejects)
    out: list[dict] = []
    for number, rec in good:
        image_id = rec["Image Index"].strip() or None
        try:
            labels = parse_nih_labels(rec["Finding Labels"])
        except UnknownLabelError as err:
            rejects.append(Reject(number, str(err), rec, image_id))
            continue
        age, age_error = parse_age(rec["Patient Age"])
        if age_error:
            rejects.append(Reject(number, age_error, rec, image_id))
            continue
        study = rec["Follow-up #"].strip()
        out.append(
            {
                "row": number,
                "image_id": image_id,
                "path": image_id,
                "patient_id": None if blank(rec["Patient ID"]) else nih_patient_id(rec["Patient ID"]),
                "study": int(study) if study.isdigit() else None,
                "age": age,
                "sex": normalize_sex(rec["Patient Gender"]),
                "view": rec["View Position"].strip().upper() or "UNKNOWN",
                **labels,
                "source": "nih",
                "record": rec,
            }
        )
    return ParsedSource(rows=rows_frame(out), rejects=rejects, rows_in=rows_in)
