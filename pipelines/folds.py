"""Patient-grouped, multi-label-stratified k-fold cross-validation folds, with their leakage audit.

Every image of the run's shards (train, val and test pooled: cross-validation judges the training
recipe, not the run's model) goes to exactly one fold, all images of a patient to the same fold.
For fold k the other folds are the training pool, from which an inner validation split is drawn by
patient (with ``pipelines.split.split_patients``, the split ``cxr split`` makes) to choose the
checkpoint; fold k's images are scored only by that fold's model.

Why this assignment: scikit-learn's ``StratifiedGroupKFold`` stratifies one label, and an image
here carries up to 14 findings at once; stratifying on a combined key (the label set as a string)
gives hundreds of keys of one or two patients each and spreads no rare finding. Instead, iterative
stratification (Sechidis, Tsoumakas & Vlahavas, 2011) with the patient as the unit: findings are
taken rarest first; every patient who carries the finding and has no fold yet goes to the fold that
holds the fewest positive images of it so far (ties: the fold least filled with the patient's
other findings, then the one with fewest images, then the lowest index). A rare finding's few patients are thus spread one per fold before the common findings,
which spread easily, are placed; patients with no finding fill the folds towards equal image
counts. Patients are visited in one seeded random order, so the folds are a function of the data
and the seed alone. Where fewer patients carry a finding than there are folds, some folds cannot
hold a positive of it: that shortfall is reported, never hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipelines.errors import UserInputError
from pipelines.ids import normalize_ids
from pipelines.labels import FINDINGS, POSITIVE
from pipelines.split import LeakageError, audit_leakage, split_patients

ROLES = ("train", "val", "held_out")  # an image's part in one fold's run
INNER_SEED_STRIDE = 1000  # the inner split of fold k is drawn with seed * stride + k
FOLD_COLUMNS = ["fold", "image_id", "patient_id", "role"]


@dataclass
class FoldPlan:
    """The folds and, per fold, every image's role in that fold's run."""

    folds: int
    seed: int
    val_frac: float
    roles: pd.DataFrame  # fold (1..folds), image_id, patient_id, role: every image once per fold
    shortfalls: list[dict] = field(default_factory=list)  # {finding, positives, patients, folds_with_positives, folds}

    @property
    def assignment(self) -> pd.DataFrame:
        """image_id, patient_id, fold: the fold that holds each image out."""
        held = self.roles[self.roles["role"] == "held_out"]
        return held[["image_id", "patient_id", "fold"]].reset_index(drop=True)

    def ids(self, fold: int, role: str) -> list[str]:
        """The image ids of ``role`` (train, val, held_out) in fold ``fold``'s run, sorted."""
        rows = self.roles[(self.roles["fold"] == fold) & (self.roles["role"] == role)]
        return sorted(rows["image_id"].astype(str))


def check_folds(folds: int) -> None:
    if not isinstance(folds, (int, np.integer)) or isinstance(folds, bool) or folds < 2:
        raise UserInputError(f"--folds must be an integer >= 2 (cross-validation needs a fold to hold out and one to train on), got {folds!r}")


def _patients(table: pd.DataFrame) -> pd.DataFrame:
    table = table.assign(image_id=table["image_id"].astype(str), patient_id=normalize_ids(table["patient_id"]))
    unknown = table["patient_id"].isna()
    if unknown.any():
        raise UserInputError(f"{int(unknown.sum())} image(s) have no patient_id (e.g. {list(table.loc[unknown, 'image_id'][:3])}): "
                             "patient-grouped folds need every image's patient")
    return table


def assign_folds(table: pd.DataFrame, folds: int, seed: int = 0) -> tuple[pd.DataFrame, list[dict]]:
    """``image_id, patient_id, fold`` (1..``folds``) for every row of ``table`` (image_id, patient_id and the 14
    finding columns), and the findings whose positives could not reach every fold. See the module
    docstring for the algorithm; deterministic in ``seed``."""
    check_folds(folds)
    table = _patients(table)
    positives = (table[list(FINDINGS)] == POSITIVE).astype(np.int64)
    per_patient = positives.groupby(table["patient_id"]).sum().sort_index()  # stable order: same seed, same folds
    ids = per_patient.index.to_numpy()
    if len(ids) < folds:
        raise UserInputError(f"--folds {folds} is more than the {len(ids)} patient(s) in the shards: "
                             f"each fold needs a patient of its own; choose --folds {max(len(ids), 2)} or fewer")
    pos = per_patient.to_numpy()
    n_images = table.groupby("patient_id").size().reindex(ids).to_numpy()
    order = np.random.default_rng(seed).permutation(len(ids))
    fold_of = np.full(len(ids), -1)
    fold_pos = np.zeros((folds, len(FINDINGS)), dtype=np.int64)
    fold_images = np.zeros(folds, dtype=np.int64)

    def place(i: int, k: int) -> None:
        fold_of[i] = k
        fold_pos[k] += pos[i]
        fold_images[k] += n_images[i]

    total = pos.sum(axis=0)
    share = 1.0 / np.maximum(total, 1)

    def load(i: int, k: int) -> float:
        """How full fold k already is with the patient's other findings (shares of each total)."""
        return float(((pos[i] > 0) * fold_pos[k] * share).sum())

    for f in sorted(range(len(FINDINGS)), key=lambda j: (total[j], FINDINGS[j])):
        for i in order:
            if fold_of[i] < 0 and pos[i, f] > 0:
                place(i, min(range(folds), key=lambda k: (fold_pos[k, f], load(i, k), fold_images[k], k)))
    for i in order:
        if fold_of[i] < 0:
            place(i, min(range(folds), key=lambda k: (fold_images[k], k)))

    shortfalls = []
    for f, name in enumerate(FINDINGS):
        reached = int((fold_pos[:, f] > 0).sum())
        if reached < folds:
            shortfalls.append({"finding": name, "positives": int(total[f]), "patients": int((pos[:, f] > 0).sum()),
                               "folds_with_positives": reached, "folds": folds})
    fold_of_patient = dict(zip(ids, fold_of))
    assignment = pd.DataFrame({"image_id": table["image_id"].astype("string"), "patient_id": table["patient_id"].astype("string"),
                               "fold": np.array([fold_of_patient[p] + 1 for p in table["patient_id"]], dtype=np.int64)})
    return assignment, shortfalls


def plan_folds(table: pd.DataFrame, folds: int, seed: int = 0, val_frac: float = 0.15) -> FoldPlan:
    """Folds over ``table`` (every image to score: image_id, patient_id, findings) and, for each
    fold, an inner validation split of ``val_frac`` of its training pool drawn by patient; audited
    (:func:`audit_folds`) before it is returned."""
    check_folds(folds)
    if not isinstance(val_frac, (int, float)) or isinstance(val_frac, bool) or not 0 < val_frac < 1:
        raise UserInputError(f"--val-frac must be in (0, 1): each fold needs an inner validation split to choose its checkpoint, got {val_frac!r}")
    table = _patients(table)
    assignment, shortfalls = assign_folds(table, folds, seed)
    parts = []
    for k in range(1, folds + 1):
        held = assignment[assignment["fold"] == k]
        pool = table[~table["image_id"].isin(held["image_id"])]
        inner = split_patients(pool, test_frac=0.0, val_frac=val_frac, seed=seed * INNER_SEED_STRIDE + k).splits
        parts.append(pd.DataFrame({"fold": k, "image_id": held["image_id"], "patient_id": held["patient_id"], "role": "held_out"}))
        parts.append(pd.DataFrame({"fold": k, "image_id": inner["image_id"], "patient_id": inner["patient_id"], "role": inner["split"]}))
    roles = pd.concat(parts, ignore_index=True)
    roles = roles.assign(fold=roles["fold"].astype(np.int64), image_id=roles["image_id"].astype("string"),
                         patient_id=roles["patient_id"].astype("string"), role=roles["role"].astype("string"))
    plan = FoldPlan(folds, seed, float(val_frac), roles, shortfalls)
    audit_folds(plan.roles, table)
    return plan


def audit_folds(roles: pd.DataFrame, table: pd.DataFrame | None = None) -> None:
    """Fail loudly (``LeakageError``) unless: every patient's images are held out by one fold only;
    no image is held out twice (or, given ``table``, never); and in every fold's run each patient has
    one role, so no held-out patient is in that fold's training or inner validation, and every image
    has exactly one role. Runs on every plan made or read back."""
    unknown = sorted(set(roles["role"].astype(str)) - set(ROLES))
    if unknown:
        raise LeakageError(f"unknown fold role(s) {unknown}: expected {', '.join(ROLES)}")
    for k, part in roles.groupby("fold"):
        try:
            audit_leakage(part.assign(split=part["role"]), table)
        except LeakageError as err:
            raise LeakageError(f"cross-validation fold {k}: {err} (the 'splits' here are its roles {', '.join(ROLES)})") from None
        if not (part["role"] == "held_out").any():
            raise LeakageError(f"cross-validation fold {k} holds out no image")
    held = roles[roles["role"] == "held_out"]
    try:
        audit_leakage(held.assign(split=held["fold"].astype(str)), table)
    except LeakageError as err:
        raise LeakageError(f"cross-validation folds: {err} (a 'split' here is the fold that holds an image out)") from None


def read_fold_roles(path) -> pd.DataFrame:
    """A plan's roles table as written to ``cv/folds.parquet``, audited again on reading."""
    roles = pd.read_parquet(path, columns=FOLD_COLUMNS)
    audit_folds(roles)
    return roles
