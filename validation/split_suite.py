"""The split suite: splits.parquet against the manifest. Every check here is table-level: a split
that misses images or leaks a patient is wrong as a whole and must be made again, so nothing is
quarantined; per-split positives are reported (and flagged where a split has none)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.ids import normalize_ids
from pipelines.labels import FINDINGS, POSITIVE
from pipelines.shards import SPLITS
from validation.checks import Check
from validation.gx_runner import run_checks
from validation.results import SuiteResult

SUITE = "splits"
SPLIT_COLUMNS = ("image_id", "patient_id", "split")
IN_MANIFEST = "in_manifest"  # derived: the split row's image is a manifest image
MANIFEST_PATIENT = "manifest_patient_id"  # derived: the manifest's patient for the image
FIRST_OF_PATIENT_SPLIT = "first_of_patient_split"  # derived: the first row of its (patient, split)


def split_frame(manifest: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The table the suite judges: every split row, plus a row with a null ``split`` for each
    manifest image the splits leave out; with the manifest's patient and findings per image and a
    0/1 ``is_<split>`` column per split (its mean is the split's fraction of images), and a marker
    of each (patient, split) pair's first row. Patient ids on both sides are compared normalized
    (pipelines/ids.py: ``766.0`` is patient ``766``), so a respelled id cannot hide a leak."""
    known = manifest.drop_duplicates("image_id").set_index("image_id")
    rows = splits.loc[:, list(SPLIT_COLUMNS)].reset_index(drop=True)
    rows[IN_MANIFEST] = rows["image_id"].isin(known.index)
    left_out = known.index.difference(pd.Index(rows["image_id"].dropna()))
    unsplit = pd.DataFrame(
        {"image_id": left_out, "patient_id": known.loc[left_out, "patient_id"].to_numpy(), "split": None, IN_MANIFEST: True}
    )
    frame = pd.concat([rows, unsplit], ignore_index=True) if len(unsplit) else rows
    frame["split"] = frame["split"].astype("string")
    frame["patient_id"] = normalize_ids(frame["patient_id"])
    frame[MANIFEST_PATIENT] = normalize_ids(frame["image_id"].map(known["patient_id"]))
    for f in FINDINGS:
        frame[f] = frame["image_id"].map(known[f]).astype("Int8")
    for s in SPLITS:
        frame[f"is_{s}"] = (frame["split"] == s).fillna(False).astype("int8")
    keys = frame[["patient_id", "split"]]
    frame[FIRST_OF_PATIENT_SPLIT] = ~keys.duplicated() & keys.notna().all(axis=1)
    return frame


def granularity(frame: pd.DataFrame) -> float:
    """The largest patient's share of the images: how far a split's fraction can miss its target
    because patients move as whole groups. Negligible on large collections (NIH: 184 of 112,120
    images), decisive on small ones (42 images, patients of up to 4: 0.095)."""
    patients = frame["patient_id"].dropna()
    largest = int(patients.value_counts().max()) if len(patients) else 1
    return largest / max(len(frame), 1)


def fraction_slack(fractions: dict[str, float], share: float) -> dict[str, float]:
    """How far whole patients can push each split off its target: test, then validation, are drawn
    until each reaches its target, so each overshoots by less than one patient (``share``);
    training takes the rest, so it can fall short by both. A split with a target of 0 has nothing
    drawn for it and gets none. The fraction check's tolerance is at least this (split_checks)."""
    slack = {s: share if fractions[s] > 0 else 0.0 for s in ("test", "val")}
    slack["train"] = sum(slack.values()) if fractions["train"] > 0 else 0.0
    return slack


def split_checks(fractions: dict[str, float], tolerance: float, slack: dict[str, float] | None = None) -> list[Check]:
    """The split suite for a frame from split_frame. The leak check asks GX whether ``patient_id``
    is unique over one row per (patient, split): a patient in two splits appears twice. (Holding
    each split's patients against the other splits' patient sets with
    ExpectColumnValuesToNotBeInSet is the same check, but GX 1.24 re-serializes an expectation's
    arguments at every step: on NIH's 112,120 rows, with its patients as value sets, the suite took
    27 s instead of about 3.)"""
    checks = [
        Check("ExpectColumnValuesToNotBeNull", {"column": "split"}, "split: every manifest image is in a split", "table"),
        Check("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)}, f"split, {{{', '.join(SPLITS)}}}", "table"),
        Check("ExpectColumnValuesToBeUnique", {"column": "image_id"}, "image_id: in exactly one split", "table"),
        Check("ExpectColumnValuesToBeInSet", {"column": IN_MANIFEST, "value_set": [True]}, "split images are manifest images", "table"),
        Check(
            "ExpectColumnPairValuesToBeEqual",
            {"column_A": "patient_id", "column_B": MANIFEST_PATIENT, "ignore_row_if": "either_value_is_missing"},
            "patient_id, manifest patient_id",
            "table",
        ),
        Check(
            "ExpectColumnValuesToBeUnique",
            {"column": "patient_id"},
            "patient_id over one row per patient and split: no patient in two splits",
            "table",
            where=(FIRST_OF_PATIENT_SPLIT, True),
        ),
    ]
    for s in SPLITS:
        width = max(tolerance, (slack or {}).get(s, 0.0))  # never tighter than whole patients allow
        lo, hi = max(0.0, fractions[s] - width), min(1.0, fractions[s] + width)
        checks.append(
            Check("ExpectColumnMeanToBeBetween", {"column": f"is_{s}", "min_value": lo, "max_value": hi}, f"{s} fraction, {lo:.3f}..{hi:.3f}", "table")
        )
    checks += [
        Check("ExpectColumnMaxToBeBetween", {"column": f, "min_value": POSITIVE}, f"{f} in {s}, a positive", "flag", where=("split", s))
        for s in SPLITS
        for f in FINDINGS
    ]
    return checks


def positives_table(frame: pd.DataFrame) -> list[dict]:
    """Positives per finding and split (and the split's image count): reported, not judged."""
    labelled = frame[frame["split"].isin(SPLITS)]
    counts = (labelled[list(FINDINGS)] == POSITIVE).groupby(labelled["split"]).sum()
    images = labelled["split"].value_counts()
    return [
        {"split": s, "images": int(images.get(s, 0)), **{f: int(counts.loc[s, f]) if s in counts.index else 0 for f in FINDINGS}}
        for s in SPLITS
    ]


def validate_splits(
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    out_dir: Path,
    test_frac: float,
    val_frac: float,
    tolerance: float = 0.05,
) -> SuiteResult:
    """Run the split suite. A splits table without its contract columns is judged on its columns
    alone (nothing else can be computed); the result then says which are missing. Each split's
    fraction may miss its target by ``tolerance``, or by what whole patients force where that is
    more (:func:`fraction_slack`: small collections)."""
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        check = Check("ExpectTableColumnsToMatchSet", {"column_set": list(SPLIT_COLUMNS), "exact_match": False}, ", ".join(SPLIT_COLUMNS), "table")
        return run_checks(SUITE, splits, [check], out_dir)
    fractions = {"train": 1.0 - test_frac - val_frac, "val": val_frac, "test": test_frac}
    frame = split_frame(manifest, splits)
    result = run_checks(SUITE, frame, split_checks(fractions, tolerance, fraction_slack(fractions, granularity(frame))), out_dir)
    result.tables["positives_per_split"] = positives_table(frame)
    return result
