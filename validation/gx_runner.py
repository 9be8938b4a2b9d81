"""Run a list of Checks as one Great Expectations suite over one DataFrame, store the result and
build its Data Docs, and translate GX's verdicts back into rows of the input table.

GX is imported here and only when a suite runs: importing it takes seconds, and most of the CLI
never needs it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from validation.checks import Check
from validation.offline_assets import localize_site
from validation.results import ExpectationOutcome, SuiteResult

log = logging.getLogger(__name__)

GX_STORE_DIR = "gx"  # expectation suites and validation results (JSON), read by the docs builder
DATA_DOCS_DIR = "data_docs"
SITE_NAME = "local_site"
DATASOURCE = "cxr"
SAMPLE_VALUES = 5  # unexpected values quoted in an outcome's detail
SEVERITY = {"table": "critical", "record": "warning", "flag": "info"}  # GX's own failure severities
LEVELLED = "validation.data_docs"  # GX's site builders, with the three validation levels (module)


def _import_gx() -> Any:
    """GX sends usage statistics unless told not to; the pipeline runs offline."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx  # slow import, kept off the CLI's start-up path

    return gx


def _context(gx: Any, out_dir: Path) -> Any:
    """An ephemeral context whose suites and results live on disk under ``out_dir/gx`` and whose
    Data Docs site is ``out_dir/data_docs``: the site index then lists every suite run of the run
    directory, whichever process ran it, while datasources and checkpoints stay in memory. The
    site's index and validation pages say passed / passed with N warnings / failed
    (validation/data_docs.py)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        ProgressBarsConfig,
    )

    def on_disk(store_class: str, folder: str) -> dict:
        return {
            "class_name": store_class,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(out_dir / GX_STORE_DIR / folder),
            },
        }

    def in_memory(store_class: str) -> dict:
        return {"class_name": store_class, "store_backend": {"class_name": "InMemoryStoreBackend"}}

    config = DataContextConfig(
        expectations_store_name="expectations_store",
        validation_results_store_name="validation_results_store",
        checkpoint_store_name="checkpoint_store",
        stores={
            "expectations_store": on_disk("ExpectationsStore", "expectations"),
            "validation_results_store": on_disk("ValidationResultsStore", "validations"),
            "checkpoint_store": in_memory("CheckpointStore"),
            "validation_definition_store": in_memory("ValidationDefinitionStore"),
        },
        data_docs_sites={
            SITE_NAME: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(out_dir / DATA_DOCS_DIR),
                },
                "site_index_builder": {
                    "module_name": LEVELLED,
                    "class_name": "LevelledSiteIndexBuilder",
                    "renderer": {"module_name": LEVELLED, "class_name": "LevelledSiteIndexPageRenderer"},
                },
                "site_section_builders": {
                    "validations": {
                        "renderer": {"module_name": LEVELLED, "class_name": "LevelledValidationResultsPageRenderer"},
                    },
                },
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _expectation(gx: Any, check: Check) -> Any:
    """The GX expectation for ``check``, tagged with the check's name so results map back,
    described by that name so the Data Docs page shows it in place of GX's generic sentence, and
    given the GX severity of its level (stored with the result)."""
    from great_expectations.expectations.row_conditions import Column

    kwargs = dict(check.kwargs)
    if check.where is not None:
        column, value = check.where
        kwargs["row_condition"] = Column(column) == value
    cls = getattr(gx.expectations, check.expectation)
    return cls(**kwargs, meta={"check": check.name}, description=check.name, severity=SEVERITY[check.level])


def _exception_message(result: Any) -> str | None:
    """GX reports an expectation it could not evaluate (a missing column) in ``exception_info``,
    either flat or keyed by metric."""
    info = result.exception_info or {}
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message") or "exception while evaluating").splitlines()[0]
    return None


def _detail(result: dict, error: str | None, success: bool) -> str:
    if error:
        return f"could not be evaluated: {error}"
    if "unexpected_count" in result:
        count, total = int(result.get("unexpected_count") or 0), int(result.get("element_count") or 0)
        if success or not count:
            return f"0 of {total} rows unexpected"
        sample = list(dict.fromkeys(str(v) for v in result.get("unexpected_list", [])))[:SAMPLE_VALUES]
        return f"{count} of {total} rows unexpected, e.g. {', '.join(sample)}"
    observed = result.get("observed_value")
    mismatched = (result.get("details") or {}).get("mismatched")
    return f"observed {observed}" + (f"; mismatched {mismatched}" if mismatched else "")


def run_checks(suite_name: str, table: pd.DataFrame, checks: Sequence[Check], out_dir: Path) -> SuiteResult:
    """Validate ``table`` against ``checks`` as the GX suite ``suite_name``; write the result and
    Data Docs under ``out_dir`` (made to work offline: validation/offline_assets.py). Rows are
    identified by position (the table is re-indexed 0..n-1). The result's ``success`` is false only
    when a table- or record-level check failed: flags do not count (validation/results.py)."""
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"suite {suite_name!r} has duplicate check names")
    out_dir = Path(out_dir).resolve()
    table = table.reset_index(drop=True)

    gx = _import_gx()
    context = _context(gx, out_dir)
    batch = (
        context.data_sources.add_pandas(DATASOURCE)
        .add_dataframe_asset(suite_name)
        .add_batch_definition_whole_dataframe("whole table")
    )
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=suite_name, expectations=[_expectation(gx, c) for c in checks])
    )
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite_name,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data docs", site_names=[SITE_NAME])],
            result_format={"result_format": "COMPLETE"},
        )
    )
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": table})
    (identifier, validation), = checkpoint_result.run_results.items()

    results = {r.expectation_config.meta["check"]: r for r in validation.results}
    outcomes: list[ExpectationOutcome] = []
    failed_rows: dict[int, list[str]] = {}
    for check in checks:  # in suite order, so each row's reasons come in a stable order
        r = results[check.name]
        error = _exception_message(r)
        result = r.result or {}
        outcomes.append(
            ExpectationOutcome(
                name=check.name,
                column=check.column,
                success=bool(r.success),
                unexpected_count=0 if r.success else int(result.get("unexpected_count") or 0),
                table_level=check.level == "table" or error is not None,
                detail=_detail(result, error, bool(r.success)),
                flag_only=check.level == "flag" and error is None,
            )
        )
        if check.level == "record" and error is None and not r.success:
            for position in result.get("unexpected_index_list") or []:
                failed_rows.setdefault(int(position), []).append(check.name)

    site = out_dir / DATA_DOCS_DIR
    localized = localize_site(site)
    for page, urls in localized.unknown.items():
        log.warning("Data Docs page %s: removed what it would load from outside the run directory: %s", page, ", ".join(urls))
    for page in localized.charts:
        log.warning("Data Docs page %s draws a chart; its scripts are not vendored, so it shows no chart", page)
    pages = context.get_docs_sites_urls(resource_identifier=identifier, site_names=[SITE_NAME])
    page = Path(url2pathname(urlparse(pages[0]["site_url"]).path)) if pages else None
    return SuiteResult(
        suite=suite_name,
        success=not any(not o.success and not o.flag_only for o in outcomes),
        outcomes=outcomes,
        failed_rows={k: failed_rows[k] for k in sorted(failed_rows)},
        docs_path=site / "index.html",
        page_path=page,
        rows=len(table),
    )
