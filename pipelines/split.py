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

from pipelines.labels import FINDINGS, POSITIVE

MAX_EVAL_SHARE = 1 / 3


class LeakageError(RuntimeError):
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
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if test_frac + val_frac >= 1:
        raise ValueError(f"--test-frac + --val-frac must leave images for training, got {test_frac + val_frac:.2f}")


def split_patients(
    manifest: pd.DataFrame, test_frac: float = 0.15, val_frac: float = 0.15, min_positives: int = 10, seed: int = 0
) -> SplitResult:
    """Assign every patient of ``manifest`` to exactly one of test, val, train. Deterministic in ``seed``."""
    _validate_fractions(test_frac, val_frac)
    if min_positives < 0:
        raise ValueError(f"--min-positives must be >= 0, got {min_positives}")
    positives = (manifest[list(FINDINGS)] == POSITIVE).astype(np.int64)
    per_patient = positives.groupby(manifest["patient_id"]).sum()
    per_patient["n_images"] = manifest.groupby("patient_id").size()
    per_patient = per_patient.sort_index()  # a stable order before shuffling: same seed, same split
    rng = np.random.default_rng(seed)
    order = per_patient.index.to_numpy()[rng.permutation(len(per_patient))]
    total_images = len(manifest)
    total_pos = positives.sum()
    assigned: dict[str, str] = {}
    shortfalls: list[dict] = []

    for split, frac in (("test", test_frac), ("val", val_frac)):
        if frac == 0:
            continue
        taken = pd.Series(0, index=list(FINDINGS), dtype=np.int64)
        images = 0

        def take(patient: str) -> None:
            nonlocal images
            assigned[patient] = split
            taken.loc[:] += per_patient.loc[patient, list(FINDINGS)].to_numpy()
            images += int(per_patient.loc[patient, "n_images"])

        for finding in sorted(FINDINGS, key=lambda f: (total_pos[f], f)):
            cap = math.floor(total_pos[finding] * MAX_EVAL_SHARE)
            wanted = min(min_positives, cap)
            for patient in order:
                if taken[finding] >= wanted:
                    break
                if patient in assigned or per_patient.at[patient, finding] == 0:
                    continue
                if taken[finding] + per_patient.at[patient, finding] > max(cap, 1):
                    continue  # would take more than this split's share of the finding
                take(patient)
            if taken[finding] < min_positives and total_pos[finding] > 0:
                shortfalls.append({"split": split, "finding": finding, "positives": int(taken[finding]), "wanted": min_positives, "available": int(total_pos[finding])})
        target = frac * total_images
        for patient in order:
            if images >= target:
                break
            if patient not in assigned:
                take(patient)

    split_of = [assigned.get(p, "train") for p in manifest["patient_id"]]
    splits = pd.DataFrame({"image_id": manifest["image_id"].astype("string"), "patient_id": manifest["patient_id"].astype("string"), "split": pd.array(split_of, dtype="string")})
    audit_leakage(splits, manifest)
    return SplitResult(splits, shortfalls)


def audit_leakage(splits: pd.DataFrame, manifest: pd.DataFrame | None = None) -> None:
    """Fail loudly if a patient is in two splits, or (given the manifest) an image is in no split
    or in several. Runs at the end of every split; can also audit a split made elsewhere."""
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
