"""The GX manifest suite on the full NIH label file (112,120 rows) against two baselines in the
same run: parsing that file, and plain pandas doing the same record checks (no report, no Data Docs).

    .venv/bin/python -m benchmarks.validate_manifest --repeat 3

Prints a Markdown table. The first suite run of a process also pays for importing GX (what
``cxr validate`` pays); the warm runs are the best of ``--repeat``, each writing its result and
Data Docs page to a temporary run directory.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ["GX_ANALYTICS_ENABLED"] = "false"

import pandas as pd

from pipelines.labels import FINDINGS, LABEL_VALUES, SEXES, VIEWS
from pipelines.manifest import MANIFEST_COLUMNS, conform_manifest
from pipelines.sources.nih import parse_nih
from validation import validate_manifest
from validation.manifest_suite import AGE_RANGE, COLUMN_TYPES, NAMING, NOT_NULL

NIH_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"


def pandas_checks(m: pd.DataFrame) -> int:
    """The manifest suite's checks in plain pandas; returns the number of failing rows."""
    assert set(m.columns) == set(MANIFEST_COLUMNS)
    assert all(m[c].dtype.type.__name__ == t for c, t in COLUMN_TYPES.items())
    bad = pd.Series(False, index=m.index)
    for c in NOT_NULL:
        bad |= m[c].isna()
    bad |= m["image_id"].duplicated(keep=False)
    for f in FINDINGS:
        bad |= ~m[f].isin(LABEL_VALUES)
    bad |= ~m["sex"].isin(SEXES).fillna(True) | ~m["view"].isin(VIEWS).fillna(True)
    bad |= ~m["age"].between(*AGE_RANGE).fillna(True)
    bad |= ~m["image_id"].str.match(NAMING["nih"][0]).fillna(True)
    part = m["image_id"].str.extract(NAMING["nih"][1], expand=False)
    bad |= (part != m["patient_id"]).fillna(False)
    return int(bad.sum())


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=NIH_CSV, help="NIH Data_Entry_2017*.csv(.gz)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per step (best is reported)")
    args = parser.parse_args()

    parse_s, parsed = best_of(1, lambda: parse_nih(args.csv))
    manifest = conform_manifest(parsed.rows)
    rows = len(manifest)

    pandas_s, pandas_bad = best_of(args.repeat, lambda: pandas_checks(manifest))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "validation"
        cold_s, _ = best_of(1, lambda: validate_manifest(manifest, out, source="nih"))  # imports GX
        warm_s, result = best_of(args.repeat, lambda: validate_manifest(manifest, out, source="nih"))
    assert len(result.failed_rows) == pandas_bad, (len(result.failed_rows), pandas_bad)

    print(f"NIH label file: {rows:,} rows, {len(result.outcomes)} expectations, "
          f"{len(result.failed_rows)} failing rows, suite {'passed' if result.success else 'failed'}\n")
    print("| step | seconds | rows/s | vs plain pandas checks |")
    print("|---|---:|---:|---:|")
    for name, seconds in (
        ("parse the label file (`parse_nih`, baseline)", parse_s),
        ("plain pandas, same record checks (baseline)", pandas_s),
        ("GX manifest suite + stored result + Data Docs page, warm", warm_s),
        ("the same, first call in the process (includes importing GX)", cold_s),
    ):
        print(f"| {name} | {seconds:.2f} | {rows / seconds:,.0f} | {seconds / pandas_s:.1f}x |")


if __name__ == "__main__":
    main()
