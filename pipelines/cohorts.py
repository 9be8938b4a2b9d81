"""Cohorts: which collection, site or study each image came from, as the manifest's optional
``cohort`` column. Collections differ in case mix, and a model can look good on one and know
nothing on another: evaluation breaks every figure down by cohort when the column is present."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines.manifest import ContractError
from pipelines.errors import UserInputError

COHORT = "cohort"
UNASSIGNED = "unassigned"
ID_HEADERS = ("image_id", "Image Index", "Path", "path")  # the first column may carry any of these names
SHOWN = 5


@dataclass
class CohortAssignment:
    cohorts: pd.Series  # one cohort per manifest row, aligned with its index
    notes: list[str]


def read_cohort_file(path: Path) -> pd.Series:
    """A two-column CSV (image id, cohort) as a Series indexed by image id. The id column may be
    named like the manifest (``image_id``) or like the source (NIH's ``Image Index``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cohorts file not found: {path}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if table.shape[1] != 2:
        raise ContractError(f"{path}: a cohorts file has two columns (image id, cohort), found {list(table.columns)}")
    ids, names = table.iloc[:, 0].str.strip(), table.iloc[:, 1].str.strip()
    if table.columns[0] not in ID_HEADERS:
        raise ContractError(f"{path}: the first column must be the image id ({', '.join(ID_HEADERS)}), found {table.columns[0]!r}")
    blank = table.index[(ids == "") | (names == "")]
    if len(blank):
        raise ContractError(f"{path}: {len(blank)} row(s) with an empty id or cohort (first at data row {int(blank[0]) + 1})")
    twice = ids[ids.duplicated(keep=False)]
    conflicting = [i for i in twice.unique() if names[ids == i].nunique() > 1]
    if conflicting:
        raise ContractError(f"{path}: {len(conflicting)} image id(s) given two different cohorts, e.g. {', '.join(conflicting[:SHOWN])}")
    return pd.Series(names.to_numpy(), index=ids.to_numpy()).groupby(level=0).first()


def assign_cohorts(image_ids: pd.Series, listed_ids: pd.Series, name: str | None = None, path: Path | None = None) -> CohortAssignment:
    """The cohort of every manifest row: ``name`` for all, or looked up in the file at ``path``.

    ``listed_ids``: every image id of the label file (kept or quarantined), so that an id in the
    cohorts file that the collection does not list is reported rather than silently ignored.
    Manifest rows the file does not name get ``unassigned``, with a count.
    """
    if name is not None and path is not None:
        raise UserInputError("give --cohort NAME or --cohorts CSV, not both")
    if name is not None:
        if not str(name).strip():
            raise UserInputError("--cohort needs a non-empty name")
        return CohortAssignment(pd.Series(str(name).strip(), index=image_ids.index, dtype="string"), [f"cohort {name!r} for every image"])
    if path is None:
        raise UserInputError("assign_cohorts needs a name or a file")
    table = read_cohort_file(path)
    notes = []
    unknown = sorted(set(table.index) - set(listed_ids.astype(str)))
    if unknown:
        notes.append(f"{len(unknown)} id(s) in {Path(path).name} are not in the collection, e.g. {', '.join(unknown[:SHOWN])}")
    cohorts = image_ids.astype(str).map(table).fillna(UNASSIGNED).astype("string")
    missing = int((cohorts == UNASSIGNED).sum())
    if missing:
        notes.append(f"{missing} image(s) not in {Path(path).name}: cohort {UNASSIGNED!r}")
    counts = cohorts.value_counts()
    notes.append("cohorts: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return CohortAssignment(cohorts, notes)
