"""The leakage gate of external validation: an external collection must share no patient and no
image with the run's training or validation split.

A model scored on patients it learned from (or whose images chose its checkpoint and thresholds)
looks better than it is, and an external figure exists to say how it does on patients it has never
seen. Ids are compared in their one spelling (pipelines/ids.py), as the split's own audit does.
"""
from __future__ import annotations

import re

import pandas as pd

from pipelines.errors import UserInputError
from pipelines.ids import normalize_ids
from pipelines.manifest import quarantine_records

STAGE = "external"
SEEN_SPLITS = ("train", "val")
SHOWN = 5
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LeakageError(UserInputError):
    """The external collection shares patients or images with the run's train/val split."""


def check_name(name: str) -> str:
    """An external set's name is a folder name under ``<run>/external/``: no paths, no spaces."""
    if not _NAME.match(name or ""):
        raise UserInputError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, not starting with '.' or '-')")
    return name


def overlap_reasons(manifest: pd.DataFrame, splits: pd.DataFrame) -> pd.Series:
    """Per manifest row, why it may not be used (its patient, or else its image id, is in the run's
    train or validation split), or <NA> when it is clean. Every image of an overlapping patient is
    named, not only the images that themselves were seen."""
    seen = splits[splits["split"].isin(SEEN_SPLITS)]
    patients = normalize_ids(manifest["patient_id"]).reset_index(drop=True)
    images = normalize_ids(manifest["image_id"]).reset_index(drop=True)
    by_patient = patients.isin(set(normalize_ids(seen["patient_id"]).dropna()))
    by_image = images.isin(set(normalize_ids(seen["image_id"]).dropna()))
    reasons = pd.Series(pd.NA, index=manifest.index, dtype="string")
    reasons[by_image.to_numpy()] = [f"overlaps the run's train/val split (image {i})" for i in images[by_image]]
    reasons[by_patient.to_numpy()] = [f"overlaps the run's train/val split (patient {p})" for p in patients[by_patient]]
    return reasons


def _first(values: pd.Series) -> str:
    unique = list(dict.fromkeys(values.astype(str)))
    return ", ".join(unique[:SHOWN]) + (f" and {len(unique) - SHOWN} more" if len(unique) > SHOWN else "")


def refuse_overlap(manifest: pd.DataFrame, reasons: pd.Series, name: str) -> None:
    """Raise LeakageError counting and naming the first overlapping patients and images."""
    hit = reasons.notna()
    if not hit.any():
        return
    rows = manifest[hit.to_numpy()]
    raise LeakageError(
        f"external set {name!r}: {len(rows)} image(s) of {rows['patient_id'].nunique()} patient(s) share a patient or an "
        f"image id with the run's train/val split (patients {_first(rows['patient_id'])}; images {_first(rows['image_id'])}): a model cannot be "
        "validated on patients it learned from; re-run with --drop-overlap to quarantine them, or use another collection "
        "(nothing was written)"
    )


def drop_overlap(manifest: pd.DataFrame, reasons: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest without the overlapping rows, and those rows as quarantine records (stage
    ``external``, the manifest row kept as the record)."""
    hit = reasons.notna().to_numpy()
    moved = manifest[hit]
    records = [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in moved.to_dict("records")]
    quarantine = quarantine_records(STAGE, list(reasons[hit]), list(moved["image_id"]), [None] * len(moved), records)
    return manifest[~hit].reset_index(drop=True), quarantine
