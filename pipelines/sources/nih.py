"""NIH ChestX-ray14: its label file ``Data_Entry_2017*.csv`` (any revision) and its radiologist box
list ``BBox_List_2017.csv``."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pandas as pd

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS, UnknownLabelError, parse_nih_labels
from pipelines.sources.base import ParsedSource, Reject, first_reject, manifest_row, normalize_sex, parse_age, parse_study, read_label_file, rows_frame

BOX_FILES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")  # beside the label file, as NIH ships them
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# NIH's box file says "Infiltrate" where its label file (and FINDINGS) says "Infiltration".
_BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
# Where the labels come from and how far to trust them (the model card's "training data"):
# ChestX-ray14's labels were text-mined from the reports, not read off the images.
LABEL_NOTE = ("NLP-mined from the radiology reports (Wang et al., CVPR 2017), not read from the images by a radiologist; "
              "the authors report above 90% accuracy for the mining, so roughly one label in ten may be wrong, and every "
              "figure measured against these labels inherits that noise")

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
        if reject := first_reject(number, rec, image_id, image_id, ("Patient Age", age_problem), ("Follow-up #", study_problem)):
            rejects.append(reject)
            continue
        patient = normalize("patient_id", rec["Patient ID"])
        out.append(manifest_row(number, rec, image_id, image_id, patient_id=None if patient is None else nih_patient_id(patient), study=study,
                                age=age, sex=normalize_sex(rec["Patient Gender"]), view=rec["View Position"].strip().upper() or "UNKNOWN",
                                **labels, source="nih"))
    parsed.rows = rows_frame(out)
    return parsed


def read_boxes(boxes_csv: Path) -> pd.DataFrame:
    """NIH's ``BBox_List_2017.csv`` (plain or .gz) or a phantom's, as columns
    ``image_id, finding, x, y, w, h`` (pixels), finding names as in FINDINGS."""
    path = Path(boxes_csv)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:2] != ["Image Index", "Finding Label"]:
        raise UserInputError(f"{path} is not an NIH box list: expected the header {BOX_HEADER!r}")
    records = []
    for number, row in enumerate(rows[1:], start=1):
        if not any(cell.strip() for cell in row):
            continue
        finding = _BOX_LABEL_ALIASES.get(row[1].strip(), row[1].strip()) if len(row) > 1 else ""
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise UserInputError(f"{path} row {number}: expected image, finding, x, y, w, h; got {row}") from None
        if finding not in FINDINGS:
            raise UserInputError(f"{path} row {number}: unknown finding {finding!r}")
        records.append((row[0].strip(), finding, x, y, w, h))
    return pd.DataFrame(records, columns=["image_id", "finding", "x", "y", "w", "h"])
