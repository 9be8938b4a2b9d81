"""What a suite run returns, GX-free, so callers (CLI, tests, reports) never import GX."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import CxrError


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
