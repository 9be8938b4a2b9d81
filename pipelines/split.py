"""Patient-level split: test first, then validation, then training (the course's order).

Test and validation are seeded with patients carrying each finding (rarest first) until the split
holds ``min_positives`` positive images of it, then filled with random patients up to their image
fraction; every remaining patient goes to training. Each evaluation split may take at most
``MAX_EVAL_SHARE`` of a finding's positive images, so a rare finding is not drained from training;
where that cap (or the data) leaves a split short of ``min_positives``, the shortfall is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipelines.errors import CxrError, UserInputError
from pipelines.ids import normalize_ids
from pipelines.labels import FINDINGS, POSITIVE

MAX_EVAL_SHARE = 1 / 3


class LeakageError(CxrError, RuntimeError):
    """A patient appears in more than one split, or an image is in no split or in several."""


@dataclass
class SplitResult:
    splits: pd.DataFrame  # image_id, patient_id, split
    shortfalls: list[dict] = field(default_factory=list)  # {split, finding, positives, wanted}

    def positives_per_split(self, manifest: pd.DataFrame) -> pd.DataFrame:
        labeled = self.splits.merge(manifest[["image_id", *FINDINGS]], on="image_id")
        return (labeled[list(FINDINGS)] == POSITIVE).groupby(labeled["split"]).sum().T.reindex(columns=["train", "val", "test"], fill_value=0)


def _validate_fractions(test_frac: float, val_frac: float) -> None:
    for name, value in (("--test-frac", test_frac), ("--val-frac", val_frac)):
        if not 0 <= value < 1:
            raise UserInputError(f"{name} must be in [0, 1), got {value}")
    if test_frac + val_frac >= 1:
        raise UserInputError(f"--test-frac + --val-frac must leave images for training, got {test_frac + val_frac:.2f}")


def split_patients(
    manifest: pd.DataFrame, test_frac: float = 0.15, val_frac: float = 0.15, min_positives: int = 10, seed: int = 0
) -> SplitResult:
    """Assign every patient of ``manifest`` to exactly one of test, val, train. Deterministic in ``seed``.

    Patients are told apart by their normalized id (pipelines/ids.py: ``766.0`` is ``766``), also
    when the manifest was not made by ``cxr ingest``; the splits carry that spelling."""
    _validate_fractions(test_frac, val_frac)
    if min_positives < 0:
        raise UserInputError(f"--min-positives must be >= 0, got {min_positives}")
    manifest = manifest.assign(patient_id=normalize_ids(manifest["patient_id"]))
    unknown = manifest["patient_id"].isna()
    if unknown.any():
        raise UserInputError(
            f"{int(unknown.sum())} manifest image(s) have no patient_id (e.g. {list(manifest.loc[unknown, 'image_id'][:3])}): "
            "a patient-level split needs every image's patient; run `cxr validate` to quarantine them"
        )
    positives = (manifest[list(FINDINGS)] == POSITIVE).astype(np.int64)
    per_patient = positives.groupby(manifest["patient_id"]).sum().sort_index()  # stable order: same seed, same split
    ids = per_patient.index.to_numpy()
    pos = per_patient.to_numpy()  # (patients, findings) positive images
    n_images = manifest.groupby("patient_id").size().reindex(ids).to_numpy()
    order = np.random.default_rng(seed).permutation(len(ids))
    total = pos.sum(axis=0)
    caps = np.maximum(np.floor(total * MAX_EVAL_SHARE), 1).astype(np.int64)  # most positives one eval split may hold
    unassigned = total.copy()  # positives of each finding among patients not yet assigned
    split_of = np.full(len(ids), "train", dtype=object)
    free = np.ones(len(ids), dtype=bool)
    shortfalls: list[dict] = []

    def leaves_training_some(i: int) -> bool:
        """Taking patient i must not move the last positives of any finding out of training."""
        return not ((pos[i] > 0) & (unassigned - pos[i] < 1)).any()

    for split, frac in (("test", test_frac), ("val", val_frac)):
        if frac == 0:
            continue
        taken = np.zeros(len(FINDINGS), dtype=np.int64)
        images = 0

        def take(i: int) -> None:
            nonlocal images, taken, unassigned
            split_of[i], free[i] = split, False
            taken = taken + pos[i]
            unassigned = unassigned - pos[i]
            images += int(n_images[i])

        for f in sorted(range(len(FINDINGS)), key=lambda j: (total[j], FINDINGS[j])):
            wanted = min(min_positives, math.floor(total[f] * MAX_EVAL_SHARE))
            for i in order:
                if taken[f] >= wanted:
                    break
                if free[i] and pos[i, f] > 0 and taken[f] + pos[i, f] <= caps[f] and leaves_training_some(i):
                    take(i)
            if taken[f] < min_positives and total[f] > 0:
                shortfalls.append({"split": split, "finding": FINDINGS[f], "positives": int(taken[f]), "wanted": min_positives, "available": int(total[f])})
        # Fill to the target fraction, first with patients who keep every finding within this
        # split's share, then (only if the target is still not met) with anyone else who leaves
        # training some positives of every finding.
        target = frac * len(manifest)
        for within_caps in (True, False):
            for i in order:
                if images >= target:
                    break
                if free[i] and leaves_training_some(i) and (not within_caps or not (taken + pos[i] > caps).any()):
                    take(i)

    patient_split = dict(zip(ids, split_of))
    splits = pd.DataFrame(
        {
            "image_id": manifest["image_id"].astype("string"),
            "patient_id": manifest["patient_id"].astype("string"),
            "split": pd.array([patient_split[p] for p in manifest["patient_id"]], dtype="string"),
        }
    )
    audit_leakage(splits, manifest)
    return SplitResult(splits, shortfalls)


def audit_leakage(splits: pd.DataFrame, manifest: pd.DataFrame | None = None) -> None:
    """Fail loudly if a patient is in two splits, or (given the manifest) an image is in no split
    or in several. Runs at the end of every split; can also audit a split made elsewhere. Patients
    are compared by their normalized id (``766.0`` and ``766`` are one patient)."""
    splits = splits.assign(patient_id=normalize_ids(splits["patient_id"]))
    per_patient = splits.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        examples = splits[splits["patient_id"].isin(leaking.index[:5])].groupby("patient_id")["split"].unique()
        detail = "; ".join(f"{p}: {sorted(s)}" for p, s in examples.items())
        raise LeakageError(f"{len(leaking)} patient(s) appear in more than one split (e.g. {detail})")
    duplicated = splits["image_id"][splits["image_id"].duplicated()]
    if len(duplicated):
        raise LeakageError(f"{duplicated.nunique()} image(s) are in several splits (e.g. {list(duplicated[:5])})")
    if manifest is not None:
        missing = set(manifest["image_id"]) - set(splits["image_id"])
        if missing:
            raise LeakageError(f"{len(missing)} manifest image(s) are in no split (e.g. {sorted(missing)[:5]})")
