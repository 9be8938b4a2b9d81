"""NIH ChestX-ray14 ``Data_Entry_2017*.csv`` (any revision)."""
from __future__ import annotations

from pathlib import Path

from pipelines.labels import UnknownLabelError, parse_nih_labels
from pipelines.sources.base import ParsedSource, Reject, normalize_sex, parse_age, parse_study, read_label_file, rows_frame, value_reject

NIH_REQUIRED = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position")


def nih_patient_id(text: str) -> str:
    """NIH writes ``Patient ID`` as a bare integer; image names carry it zero-padded to 8 digits.
    ``text`` is the normalized id (``766.0`` already ``766``: pipelines/ids.py)."""
    t = str(text).strip()
    return t.zfill(8) if t.isdigit() else t


def parse_nih(csv_path: Path) -> ParsedSource:
    _, good, rejects = read_label_file(csv_path, NIH_REQUIRED)
    parsed = ParsedSource(rows=rows_frame([]), rejects=rejects, rows_in=len(good) + len(rejects))
    normalize = parsed.normalized
    out: list[dict] = []
    for number, rec in good:
        image_id = normalize("image_id", rec["Image Index"])
        try:
            labels = parse_nih_labels(rec["Finding Labels"])
        except UnknownLabelError as err:
            rejects.append(Reject(number, str(err), rec, image_id, kind="unknown label(s)", column="Finding Labels", value=rec["Finding Labels"], path=image_id))
            continue
        age, age_problem = parse_age(rec["Patient Age"])
        study, study_problem = parse_study(rec["Follow-up #"])
        if age_problem or study_problem:
            column, problem = ("Patient Age", age_problem) if age_problem else ("Follow-up #", study_problem)
            rejects.append(value_reject(number, column, problem, rec, image_id, path=image_id))
            continue
        patient = normalize("patient_id", rec["Patient ID"])
        out.append(
            {
                "row": number,
                "image_id": image_id,
                "path": image_id,
                "patient_id": None if patient is None else nih_patient_id(patient),
                "study": study,
                "age": age,
                "sex": normalize_sex(rec["Patient Gender"]),
                "view": rec["View Position"].strip().upper() or "UNKNOWN",
                **labels,
                "source": "nih",
                "record": rec,
            }
        )
    parsed.rows = rows_frame(out)
    return parsed
