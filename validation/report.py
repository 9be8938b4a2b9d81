"""validation/summary.json (machine-readable, merged across stages) and the CLI's short summary.

Every suite has a ``status`` in the three levels of validation/results.py: ``passed``, ``passed with
warnings`` (only flag-level expectations failed; ``warnings`` counts them, ``warnings_note`` says
in one line what they are) or ``failed`` (a table- or record-level expectation failed). The top
level has the worst of its suites' statuses and the sum of their warnings. ``success`` stays for
compatibility and means ``status != "failed"``: flags change nothing, so a suite whose only failures
are flags succeeded.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from pipelines.atomic import write_json
from pipelines.shards import SPLITS
from validation.results import FAILED, PASSED, STATUSES, WARNINGS, ExpectationOutcome, SuiteResult, status_of, status_words, worst

SUMMARY_FILE = "summary.json"
FLAGS_ARE = "flag-level: reported, they change nothing"

# What failed flags say, in words, by suite and expectation type: the one line under a suite with
# warnings, in the CLI and the run report. Each kind counts its flags (``checks``) or the records
# they name (``records``). A flag of a kind not listed here is named by its check.
FLAG_MEANINGS: dict[tuple[str, str], tuple[str, str, str]] = {  # -> (count, singular, plural)
    ("splits", "expect_column_max_to_be_between"): (
        "checks", "(finding, split) pair has no positive image", "(finding, split) pairs have no positive image"),
    ("images", "expect_column_values_to_be_between"): (
        "records", "image is smaller than the target size (upsampled)", "images are smaller than the target size (upsampled)"),
    ("manifest", "expect_column_pair_values_to_be_equal"): (
        "records", "image file has no row in the label file", "image files have no row in the label file"),
}
_CHECK_TYPE = re.compile(r"^(\w+)\(")
_SPLIT_FLAG = re.compile(r"^\w+\((.+?) in (\w+), ")  # expect_column_max_to_be_between(Hernia in val, a positive)


def _level(o: ExpectationOutcome) -> str:
    return "table" if o.table_level else "flag" if o.flag_only else "record"


def _names(items: list[str], shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def _pairs_text(pairs: list[tuple[str, str]]) -> str:
    """(finding, split) pairs in few words: findings with no positive in any split first, then the
    rest by split, e.g. ``9 findings in no split (Atelectasis, Edema, ...); in val: Hernia``."""
    by_finding: dict[str, set[str]] = {}
    for finding, split in pairs:
        by_finding.setdefault(finding, set()).add(split)
    nowhere = [f for f, splits in by_finding.items() if splits >= set(SPLITS)]
    parts = [f"{len(nowhere)} finding{'s' if len(nowhere) != 1 else ''} in no split ({_names(nowhere)})"] if nowhere else []
    for split in [*SPLITS, *sorted({s for _, s in pairs} - set(SPLITS))]:
        findings = [f for f, s in pairs if s == split and f not in nowhere]
        if findings:
            parts.append(f"in {split}: {_names(findings)}")
    return "; ".join(parts)


def warnings_note(suite: str, flags: list[ExpectationOutcome]) -> str | None:
    """One line saying what a suite's failed flags are, e.g. ``27 (finding, split) pairs have no
    positive image (Cardiomegaly in val, ...) -- flag-level: reported, they change nothing``;
    None without flags."""
    if not flags:
        return None
    groups: dict[tuple[str, str, str] | None, list[ExpectationOutcome]] = {}
    for o in flags:
        m = _CHECK_TYPE.match(o.name)
        groups.setdefault(FLAG_MEANINGS.get((suite, m.group(1))) if m else None, []).append(o)
    parts = []
    for meaning, group in groups.items():
        if meaning is None:
            names = [o.name for o in group]
            parts.append(f"{len(group)} other flag{'s' if len(group) != 1 else ''}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
            continue
        count, one, many = meaning
        n = len(group) if count == "checks" else sum(o.unexpected_count for o in group)
        pairs = [(m.group(1), m.group(2)) for m in (_SPLIT_FLAG.match(o.name) for o in group) if m]
        parts.append(f"{n} {one if n == 1 else many}" + (f": {_pairs_text(pairs)}" if pairs else ""))
    return f"{'; '.join(parts)} -- {FLAGS_ARE}"


def suite_summary(result: SuiteResult) -> dict:
    return {
        "status": result.status,
        "success": result.status != FAILED,
        "warnings": result.warnings,
        "warnings_note": warnings_note(result.suite, result.flags),
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


def suite_status(entry: dict) -> tuple[str, int]:
    """(status, warnings) of one suite's summary entry; entries written before the three levels
    (no ``status``) are judged from their expectations' levels, or from ``success`` alone."""
    if entry.get("status") in STATUSES:
        return entry["status"], int(entry.get("warnings") or 0)
    failed = Counter(e.get("level") for e in entry.get("expectations", []) if not e.get("success"))
    if failed or "expectations" in entry:
        return status_of(failed["table"], failed["record"], failed["flag"]), failed["flag"]
    return (PASSED if entry.get("success") else FAILED), 0


def overall(summary: dict) -> dict:
    """The top level of summary.json from its suites: worst status, warnings summed, success."""
    statuses = [suite_status(s) for s in summary.get("suites", {}).values()]
    status = worst(s for s, _ in statuses)
    return {"status": status, "success": status != FAILED, "warnings": sum(w for _, w in statuses)}


def write_summary(results: list[SuiteResult], validation_dir: Path) -> Path:
    """Write each suite's summary into ``validation_dir/summary.json``, keeping the suites other
    stages wrote there (a re-run of a suite replaces its own entry)."""
    path = Path(validation_dir) / SUMMARY_FILE
    suites = json.loads(path.read_text()).get("suites", {}) if path.exists() else {}
    suites.update({r.suite: suite_summary(r) for r in results})
    summary = {**overall({"suites": suites}), "suites": suites}
    return write_json(path, summary)


def overall_line(summary: dict) -> str:
    """``data validation: passed with 27 warnings (manifest passed, splits passed with 27 warnings)``
    and, per suite with warnings, the line saying what they are."""
    suites = {name: suite_status(entry) for name, entry in summary.get("suites", {}).items()}
    top = overall(summary)
    lines = [f"data validation: {status_words(top['status'], top['warnings'])} ("
             + ", ".join(f"{name} {status_words(*s)}" for name, s in suites.items()) + ")"]
    for name, (status, _) in suites.items():
        note = summary["suites"][name].get("warnings_note")
        if status == WARNINGS and note:
            lines.append(f"  {name} warnings: {note}")
    return "\n".join(lines)


MAX_FLAGS_SHOWN = 5


def format_summary(results: list[SuiteResult]) -> str:
    """A few lines per suite: its verdict in words (passed / passed with N warnings / failed), each
    failed or flagged check with its record count, what the warnings are, and where the Data Docs
    page is."""
    lines: list[str] = []
    for r in results:
        failed = [o for o in r.outcomes if not o.success]
        counts = f"{len(r.outcomes)} expectations, {r.rows} rows"
        if r.status == PASSED:
            lines.append(f"{r.suite}: passed ({counts})")
        elif r.status == WARNINGS:
            lines.append(f"{r.suite}: {r.status_words} ({counts}; {FLAGS_ARE})")
        else:
            stops = (" -- table-level failure, the pipeline stops" if r.table_failures
                     else " -- the rest go on" if r.failed_rows else "")
            lines.append(
                f"{r.suite}: failed, {len(failed)} of {len(r.outcomes)} expectations "
                f"({len(r.table_failures)} table-level, {len(r.record_failures)} record-level, "
                f"{len(r.flags)} flag{'s' if len(r.flags) != 1 else ''}); {len(r.failed_rows)} of {r.rows} records quarantined{stops}"
            )
        if failed:
            # failures first, then flags; a long tail of flags is summarized (the report has them all)
            shown = [o for o in failed if not o.flag_only] + [o for o in failed if o.flag_only][:MAX_FLAGS_SHOWN]
            for o in shown:
                n = o.unexpected_count
                count = f"{n} record{'s' if n != 1 else ''}; " if n else ""
                lines.append(f"  [{_level(o)}] {o.name}: {count}{o.detail}")
            if len(shown) < len(failed):
                lines.append(f"  ... and {len(failed) - len(shown)} more flags (see the report)")
        note = warnings_note(r.suite, r.flags)
        if note:
            lines.append(f"  warnings: {note}")
        if r.report_path:
            lines.append(f"  report: {r.report_path}")
    return "\n".join(lines)
