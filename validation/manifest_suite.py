"""The manifest suite: the data contract of ``manifest.parquet`` as GX expectations.

Type names follow what GX's pandas check compares, the column's scalar type: ``str`` for pandas
string columns (``string`` fails, see docs/architecture.md, known traps), ``int16``/``int32`` for nullable
``Int16``/``Int32`` (``Int16`` fails: GX compares ``Int16Dtype`` with the scalar type ``int16``).
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd

from pipelines.labels import FINDINGS, LABEL_VALUES, SEXES, VIEWS
from pipelines.manifest import MANIFEST_COLUMNS, OPTIONAL_COLUMNS
from pipelines.sources.base import AGE_RANGE  # ingest quarantines ages outside it first, naming the row
from validation.checks import Check
from validation.gx_runner import run_checks
from validation.results import SuiteResult, combine

SUITE = "manifest"
NOT_NULL = ("image_id", "path", "patient_id", *FINDINGS)
COLUMN_TYPES: dict[str, str] = {
    **{c: "str" for c in ("image_id", "path", "patient_id", "sex", "view", "source")},
    "study": "int32",
    "age": "int16",
    **{f: "int8" for f in FINDINGS},
}
# Sources whose image names encode the patient: (regex of the whole id, regex whose group 1 is the
# patient part in the manifest's ``patient_id`` spelling).
NAMING: dict[str, tuple[str, str]] = {"nih": (r"^\d{8}_\d{3}\.png$", r"^(\d{8})_\d{3}\.png$")}
ID_PATIENT = "image_id_patient"  # derived: the patient part of image_id (GX compares it)


def _sources(manifest: pd.DataFrame, source: str | None) -> list[str]:
    if source is not None:
        return [source]
    if "source" not in manifest:
        return []
    return sorted(manifest["source"].dropna().unique())


def manifest_checks(sources: list[str], optional: tuple[str, ...] = ()) -> list[Check]:
    """The suite for a manifest whose rows come from ``sources`` and that has the ``optional``
    contract columns (a cohort). With one source the naming rules apply to every row; with several,
    each source's rules apply to its own rows."""
    named = [s for s in sources if s in NAMING]
    columns = [*MANIFEST_COLUMNS, *optional, *([ID_PATIENT] if named else [])]
    checks = [
        *(Check("ExpectColumnValuesToBeOfType", {"column": c, "type_": "str"}, f"{c}, str", "table") for c in optional),
        *(Check("ExpectColumnValuesToNotBeNull", {"column": c}, c) for c in optional),
        Check("ExpectTableColumnsToMatchSet", {"column_set": columns, "exact_match": True}, "data contract columns", "table"),
        Check("ExpectTableRowCountToBeBetween", {"min_value": 1}, ">= 1 row", "table"),
        *(Check("ExpectColumnValuesToBeOfType", {"column": c, "type_": t}, f"{c}, {t}", "table") for c, t in COLUMN_TYPES.items()),
        *(Check("ExpectColumnValuesToNotBeNull", {"column": c}, c) for c in NOT_NULL),
        Check("ExpectColumnValuesToBeUnique", {"column": "image_id"}, "image_id"),
        *(Check("ExpectColumnValuesToBeInSet", {"column": f, "value_set": list(LABEL_VALUES)}, f"{f}, {{1, 0, -1}}") for f in FINDINGS),
        Check("ExpectColumnValuesToBeInSet", {"column": "sex", "value_set": list(SEXES)}, f"sex, {{{', '.join(SEXES)}}}"),
        Check("ExpectColumnValuesToBeInSet", {"column": "view", "value_set": list(VIEWS)}, f"view, {{{', '.join(VIEWS)}}}"),
        Check("ExpectColumnValuesToBeBetween", {"column": "age", "min_value": AGE_RANGE[0], "max_value": AGE_RANGE[1]}, f"age, {AGE_RANGE[0]}..{AGE_RANGE[1]}"),
    ]
    for s in named:
        where = ("source", s) if len(sources) > 1 else None
        checks += [
            Check("ExpectColumnValuesToMatchRegex", {"column": "image_id", "regex": NAMING[s][0]}, f"image_id, {NAMING[s][0]}", where=where),
            Check(
                "ExpectColumnPairValuesToBeEqual",
                {"column_A": ID_PATIENT, "column_B": "patient_id", "ignore_row_if": "either_value_is_missing"},
                f"{s} image_id patient part, patient_id",
                where=where,
            ),
        ]
    return checks


FILES_SUITE = "manifest_image_files"
LISTED_PATH = "manifest_path"  # derived: the file's path as the manifest lists it (null: unlisted)


def image_files_frame(manifest: pd.DataFrame, image_paths: Collection[str]) -> pd.DataFrame:
    """One row per image file under the image root, with its manifest path where it has a row."""
    files = pd.Series(sorted(image_paths), dtype=object)
    listed = set(manifest["path"].dropna()) if "path" in manifest else set()
    # object dtype with None, not pandas' string NA: GX compares the pair with ``==``, and
    # ``"a" == pd.NA`` is NA, which GX cannot turn into a verdict.
    return pd.DataFrame({"path": files, LISTED_PATH: files.where(files.isin(listed), None)}, dtype=object)


# Every image has at least one row. GX's ExpectColumnDistinctValuesToContainSet(path, files) says
# the same, but GX 1.24 re-serializes an expectation's arguments at every step: with the files as
# its value set that took 6 s per 20,000 files, so the files become a table of their own. An
# unlabelled image harms nothing downstream (it is never used), so it is flagged, not fatal.
FILES_CHECK = Check(
    "ExpectColumnPairValuesToBeEqual",
    {"column_A": "path", "column_B": LISTED_PATH, "ignore_row_if": "both_values_are_missing"},
    "image file, manifest path: every image has a row",
    "flag",
)


def with_derived_columns(manifest: pd.DataFrame, sources: list[str]) -> pd.DataFrame:
    """Add the columns the naming checks compare: the patient part of each id, for rows of a source
    with a naming rule (null where the id does not follow the rule: the regex check reports those)."""
    named = [s for s in sources if s in NAMING]
    if not named or "image_id" not in manifest:
        return manifest
    out = manifest.copy()
    out[ID_PATIENT] = pd.Series(pd.NA, index=out.index, dtype="string")
    for s in named:
        rows = out.index if len(sources) == 1 else out.index[out["source"] == s]
        out.loc[rows, ID_PATIENT] = out.loc[rows, "image_id"].astype("string").str.extract(NAMING[s][1], expand=False)
    return out


def validate_manifest(
    manifest: pd.DataFrame,
    out_dir: Path,
    source: str | None = None,
    image_paths: Collection[str] | None = None,
) -> SuiteResult:
    """Run the manifest suite. ``source`` names where every row comes from (else the ``source``
    column says, row by row); ``image_paths`` (files under the image root, relative POSIX paths)
    adds the check that every image has a row. ``failed_rows`` are positions in ``manifest``."""
    sources = _sources(manifest, source)
    table = with_derived_columns(manifest.reset_index(drop=True), sources)
    optional = tuple(c for c in OPTIONAL_COLUMNS if c in manifest.columns)
    result = run_checks(SUITE, table, manifest_checks(sources, optional), out_dir)
    if image_paths is None:
        return result
    files = run_checks(FILES_SUITE, image_files_frame(manifest, image_paths), [FILES_CHECK], out_dir)
    return combine(SUITE, result, files)
