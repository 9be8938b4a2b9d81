"""validation/summary.json (machine-readable, merged across stages) and the CLI's short summary."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from validation.results import ExpectationOutcome, SuiteResult

SUMMARY_FILE = "summary.json"


def _level(o: ExpectationOutcome) -> str:
    return "table" if o.table_level else "flag" if o.flag_only else "record"


def suite_summary(result: SuiteResult) -> dict:
    return {
        "success": result.success,
        "validated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": result.rows,
        "failed_records": len(result.failed_rows),
        "failed_expectations": sum(not o.success for o in result.outcomes),
        "expectations": [
            {
                "name": o.name,
                "column": o.column,
                "level": _level(o),
                "success": o.success,
                "unexpected_count": o.unexpected_count,
                "detail": o.detail,
            }
            for o in result.outcomes
        ],
        "data_docs": str(result.docs_path) if result.docs_path else None,
        "report_page": str(result.page_path) if result.page_path else None,
        **({"tables": result.tables} if result.tables else {}),
    }


def write_summary(results: list[SuiteResult], validation_dir: Path) -> Path:
    """Write each suite's summary into ``validation_dir/summary.json``, keeping the suites other
    stages wrote there (a re-run of a suite replaces its own entry)."""
    path = Path(validation_dir) / SUMMARY_FILE
    suites = json.loads(path.read_text()).get("suites", {}) if path.exists() else {}
    suites.update({r.suite: suite_summary(r) for r in results})
    summary = {"success": all(s["success"] for s in suites.values()), "suites": suites}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    return path


MAX_FLAGS_SHOWN = 5


def format_summary(results: list[SuiteResult]) -> str:
    """A few lines per suite: its verdict, each failed or flagged check with its record count, and
    where the Data Docs page is."""
    lines: list[str] = []
    for r in results:
        failed = [o for o in r.outcomes if not o.success]
        if not failed:
            lines.append(f"{r.suite}: passed ({len(r.outcomes)} expectations, {r.rows} rows)")
        else:
            stops = " -- table-level failure, the pipeline stops" if r.table_failures else ""
            lines.append(
                f"{r.suite}: {len(failed)} of {len(r.outcomes)} expectations failed "
                f"({len(r.table_failures)} table-level, {len(r.record_failures)} record-level, "
                f"{len(r.flags)} flags); {len(r.failed_rows)} of {r.rows} records quarantined{stops}"
            )
            # failures first, then flags; a long tail of flags is summarized (the report has them all)
            failed.sort(key=lambda o: o.flag_only)
            shown = [o for o in failed if not o.flag_only] + [o for o in failed if o.flag_only][:MAX_FLAGS_SHOWN]
            for o in shown:
                n = o.unexpected_count
                count = f"{n} record{'s' if n != 1 else ''}; " if n else ""
                lines.append(f"  [{_level(o)}] {o.name}: {count}{o.detail}")
            if len(shown) < len(failed):
                lines.append(f"  ... and {len(failed) - len(shown)} more flags (see the report)")
        if r.report_path:
            lines.append(f"  report: {r.report_path}")
    return "\n".join(lines)
