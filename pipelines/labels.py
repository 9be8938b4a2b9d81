"""The finding vocabulary every stage shares, and the mapping of other sources onto it."""
from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

NO_FINDING = "No Finding"

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
LABEL_VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

# CheXpert's observation names that correspond to an NIH finding. CheXpert's other observations
# (Enlarged Cardiomediastinum, Lung Opacity, Lung Lesion, Fracture, Support Devices, Pleural Other)
# have no one-to-one NIH counterpart; mapping them would invent labels, so they are left out and the
# corresponding NIH findings CheXpert does not annotate are recorded as 0 (not mentioned = negative,
# the convention CheXpert itself uses for blanks).
CHEXPERT_TO_NIH: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}

SEXES = ("M", "F", "U")
VIEWS = ("PA", "AP", "LL", "LATERAL", "UNKNOWN")


class UnknownLabelError(ValueError):
    """A label string that is not in the vocabulary."""


def parse_nih_labels(text: str) -> dict[str, int]:
    """Turn NIH's ``Finding Labels`` cell (``A|B`` or ``No Finding``) into a 0/1 value per finding.

    Raises UnknownLabelError naming every label that is not one of the 14 findings.
    """
    values = {name: NEGATIVE for name in FINDINGS}
    parts = [p.strip() for p in str(text).split("|") if p.strip()]
    if not parts:
        raise UnknownLabelError("empty 'Finding Labels'")
    if parts == [NO_FINDING]:
        return values
    unknown = [p for p in parts if p not in values]
    if unknown:
        raise UnknownLabelError(f"unknown label(s) {', '.join(repr(u) for u in unknown)}")
    for p in parts:
        values[p] = POSITIVE
    return values


def format_nih_labels(values: dict[str, int]) -> str:
    """The inverse of parse_nih_labels, for writing NIH-style label files (phantoms)."""
    positives = [f for f in FINDINGS if values.get(f, 0) == POSITIVE]
    return "|".join(positives) if positives else NO_FINDING
