"""What a suite run returns, GX-free, so callers (CLI, tests, reports) never import GX.

Three levels of verdict, the same in summary.json, the CLI, the Data Docs and the run report:

- ``passed``: every expectation held.
- ``passed with warnings`` (``passed with N warnings`` in words): only ``flag``-level expectations
  failed. A flag is reported and changes nothing (an upsampled image, a finding without positives
  in a split), so the data went on as it was.
- ``failed``: a ``table``- or ``record``-level expectation failed. Table-level failures stop the
  pipeline (unless ``--warn-only``); record-level ones took rows out of it (quarantined) and the
  rest went on. Either way the data as given broke its contract, and a person should look.

``success`` is ``status != "failed"``: true when only flags failed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import CxrError

PASSED, WARNINGS, FAILED = "passed", "passed with warnings", "failed"
STATUSES = (PASSED, WARNINGS, FAILED)  # best to worst


def status_of(table_failures: int, record_failures: int, flags: int) -> str:
    """The three-level verdict from the counts of failed expectations per level."""
    if table_failures or record_failures:
        return FAILED
    return WARNINGS if flags else PASSED


def worst(statuses: Iterable[str]) -> str:
    """The worst of several verdicts (``passed`` for none)."""
    return max(statuses, key=STATUSES.index, default=PASSED)


def status_words(status: str, warnings: int) -> str:
    """``passed with 27 warnings`` (the count in words where the level has one)."""
    if status == WARNINGS:
        return f"passed with {warnings} warning{'s' if warnings != 1 else ''}"
    return status


@dataclass
class ExpectationOutcome:
    """One expectation's verdict. ``table_level`` failures stop the pipeline; record-level ones
    quarantine rows; ``flag_only`` ones are reported and change nothing (e.g. upsampled images)."""

    name: str
    column: str | None
    success: bool
    unexpected_count: int
    table_level: bool
    detail: str
    flag_only: bool = False


@dataclass
class SuiteResult:
    """``success`` is true unless a table- or record-level expectation failed (see ``status``)."""

    suite: str
    success: bool
    outcomes: list[ExpectationOutcome]
    failed_rows: dict[int, list[str]]  # positional row in the validated table -> failed check names
    docs_path: Path | None  # the Data Docs site's index.html
    page_path: Path | None = None  # this run's validation page inside that site
    rows: int = 0
    tables: dict[str, list[dict]] = field(default_factory=dict)  # reported figures (not checks)

    @property
    def table_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.table_level]

    @property
    def record_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and not o.table_level and not o.flag_only]

    @property
    def flags(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.flag_only]

    @property
    def warnings(self) -> int:
        """Failed flag-level expectations."""
        return len(self.flags)

    @property
    def status(self) -> str:
        """``passed``, ``passed with warnings`` or ``failed`` (module docstring)."""
        return status_of(len(self.table_failures), len(self.record_failures), len(self.flags))

    @property
    def status_words(self) -> str:
        return status_words(self.status, self.warnings)

    @property
    def report_path(self) -> Path | None:
        """The page to send a person to: this run's page, else the site index."""
        return self.page_path or self.docs_path


def combine(suite: str, main: SuiteResult, *others: SuiteResult) -> SuiteResult:
    """One result for a suite that GX ran as several validations (one per table): ``main``'s rows
    and pages, everyone's outcomes. The other tables' record failures have no rows in ``main``, so
    their checks must be table-level or flags."""
    if any(o.failed_rows for o in others):
        raise ValueError("only the main table of a combined suite can have record-level failures")
    return SuiteResult(
        suite=suite,
        success=main.success and all(o.success for o in others),
        outcomes=[o for r in (main, *others) for o in r.outcomes],
        failed_rows=main.failed_rows,
        docs_path=main.docs_path,
        page_path=main.page_path,
        rows=main.rows,
        tables={k: v for r in (main, *others) for k, v in r.tables.items()},
    )


class ValidationFailed(CxrError):
    """A table-level expectation failed: the data cannot go on to the next stage as it is."""


def raise_on_table_failures(results: list[SuiteResult], warn_only: bool = False) -> list[str]:
    """Raise ValidationFailed naming every table-level failure and the report to read, unless
    ``warn_only`` (the user chose to continue): then return the messages as warnings."""
    messages = [
        f"[{r.suite}] {o.name}: {o.detail} (report: {r.report_path})"
        for r in results
        for o in r.table_failures
    ]
    if messages and not warn_only:
        raise ValidationFailed(
            "table-level validation failed; fix the input or re-run with --warn-only to continue "
            "deliberately:\n  " + "\n  ".join(messages)
        )
    return messages
