"""CheXpert ``train.csv`` / ``valid.csv``: Path, Sex, Age, Frontal/Lateral, AP/PA, 14 observations."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pipelines.labels import CHEXPERT_TO_NIH, FINDINGS, NEGATIVE, POSITIVE, UNCERTAIN
from pipelines.sources.base import STUDY_RANGE, ParsedSource, Reject, first_reject, manifest_row, normalize_sex, parse_age, parse_whole_number, read_label_file, rows_frame

CHEXPERT_REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"study(\d+)")
# CheXpert writes 1.0 / 0.0 / -1.0 / blank; blank = not mentioned = negative (CheXpert's convention).
_VALUES = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN, "": NEGATIVE}
# Where the labels come from and how far to trust them (the model card's "training data").
LABEL_NOTE = ("extracted from the radiology reports by the CheXpert labeler (Irvin et al., AAAI 2019), with an explicit "
              "uncertain class (-1); a finding the report does not mention counts as negative, so the labels carry the "
              "labeler's and the reports' errors")


def _view(frontal_lateral: str, ap_pa: str) -> str:
    if frontal_lateral.strip().upper() == "LATERAL":
        return "LATERAL"
    return ap_pa.strip().upper() or "UNKNOWN"


def parse_chexpert(csv_path: Path) -> ParsedSource:
    header, good, rejects = read_label_file(csv_path, CHEXPERT_REQUIRED)
    parsed = ParsedSource(rows=rows_frame([]), rejects=rejects, rows_in=len(good) + len(rejects))
    normalize = parsed.normalized
    label_columns = [c for c in header if c in CHEXPERT_TO_NIH]
    out: list[dict] = []
    for number, rec in good:
        path = normalize("image_id", rec["Path"]) or ""
        patient = _PATIENT.search(path)
        if not patient:
            rejects.append(Reject(number, f"no 'patientNNNNN' in path {path!r}", rec, path or None, kind="no patient in path", column="Path", value=path, path=path or None))
            continue
        bad = [c for c in label_columns if rec[c].strip() not in _VALUES]
        if bad:
            rejects.append(
                Reject(number, "unknown label value(s) " + ", ".join(f"{c}={rec[c]!r}" for c in bad), rec, path, kind="unknown label value(s)", column=bad[0], value=rec[bad[0]], path=path)
            )
            continue
        values = {f: NEGATIVE for f in FINDINGS}
        for c in label_columns:
            values[CHEXPERT_TO_NIH[c]] = _VALUES[rec[c].strip()]
        age, age_problem = parse_age(rec["Age"])
        study_match = _STUDY.search(path)
        study, study_problem = parse_whole_number(study_match.group(1), "study", STUDY_RANGE) if study_match else (None, None)
        if reject := first_reject(number, rec, path, path, ("Age", age_problem), ("Path", study_problem)):
            rejects.append(reject)
            continue
        out.append(manifest_row(number, rec, path, path, patient_id=patient.group(1), study=study, age=age, sex=normalize_sex(rec["Sex"]),
                                view=_view(rec["Frontal/Lateral"], rec["AP/PA"]), **values, source="chexpert"))
    annotated = {CHEXPERT_TO_NIH[c] for c in label_columns}
    not_annotated = [f for f in FINDINGS if f not in annotated]
    parsed.notes = [f"CheXpert does not annotate {', '.join(not_annotated)}: recorded as 0"] if not_annotated else []
    parsed.rows = rows_frame(out)
    return parsed


def strip_dataset_folder(paths: pd.Series, images_root: Path) -> pd.Series:
    """CheXpert paths start with the dataset folder (``CheXpert-v1.0-small/train/...``). When the
    user points ``--images`` at that folder itself, drop the repeated first component."""
    first = paths.str.split("/", n=1).str[0]
    if len(paths) and (first == Path(images_root).name).all():
        return paths.str.split("/", n=1).str[1]
    return paths
