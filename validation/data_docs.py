"""The Data Docs pages in the three levels of validation/results.py (passed, passed with N warnings,
failed) instead of GX's two: GX calls a validation failed as soon as any expectation fails, flags
included, so a split whose only findings are "no positives for Hernia in val" read as broken.

GX builds the site through classes named in the site's config (validation/gx_runner.py), so these
subclasses change only what they must: the index's status column (and its filter), a note on the
index saying what the levels mean, and the status line of each validation page. The level comes
from the severity gx_runner gives each expectation (``critical`` table, ``warning`` record,
``info`` flag), stored with every result, so older results of the run directory show their level
too. This module imports GX: only GX loads it, when it builds the docs.
"""
from __future__ import annotations

from typing import Any

from great_expectations.render.components import RenderedStringTemplateContent, TextContent
from great_expectations.render.renderer.page_renderer import ValidationResultsPageRenderer
from great_expectations.render.renderer.site_builder import DefaultSiteIndexBuilder
from great_expectations.render.renderer.site_index_page_renderer import SiteIndexPageRenderer

from validation.results import FAILED, PASSED, WARNINGS, status_of, status_words

LEVEL_OF_SEVERITY = {"critical": "table", "warning": "record", "info": "flag"}
ICONS = {
    PASSED: ["fas", "fa-check-circle", "text-success"],
    WARNINGS: ["fas", "fa-exclamation-triangle", "text-warning"],
    FAILED: ["fas", "fa-times", "text-danger"],
}
LEVELS_NOTE = (
    "Status: passed, every check held; passed with N warnings, only flag-level checks failed "
    "(reported, they change nothing, e.g. a finding without positives in a split); failed, a "
    "table-level check failed (the pipeline stops) or a record-level one did (those records were "
    "quarantined, the rest went on)."
)


def _raised(result: Any) -> bool:
    info = result.exception_info or {}
    entries = [info] if "raised_exception" in info else list(info.values())
    return any(isinstance(e, dict) and e.get("raised_exception") for e in entries)


def _severity(result: Any) -> str:
    severity = getattr(result.expectation_config, "severity", None)
    return str(getattr(severity, "value", severity) or "").lower()


def validation_status(validation: Any) -> tuple[str, int]:
    """(status, warnings) of a stored GX validation result, from its failed expectations' severities;
    an expectation that raised, or has no known severity, counts as table-level."""
    counts = {"table": 0, "record": 0, "flag": 0}
    for result in validation.results:
        if result.success:
            continue
        level = "table" if _raised(result) else LEVEL_OF_SEVERITY.get(_severity(result), "table")
        counts[level] += 1
    return status_of(counts["table"], counts["record"], counts["flag"]), counts["flag"]


def _status_template(status: str, warnings: int, template: str, **styling: Any) -> RenderedStringTemplateContent:
    return RenderedStringTemplateContent(
        content_block_type="string_template",
        string_template={
            "template": template,
            "params": {"icon": "", "words": status_words(status, warnings)},
            "styling": {"params": {"icon": {"tag": "i", "classes": ICONS[status]}}, **styling},
        },
    )


class LevelledSiteIndexBuilder(DefaultSiteIndexBuilder):
    """GX's index builder, with each failed validation's three-level status in its link entry
    (``cxr_status``, ``cxr_warnings``); passed ones need no lookup."""

    def add_resource_info_to_index_links_dict(self, index_links_dict, expectation_suite_name, section_name, **kwargs):
        links = super().add_resource_info_to_index_links_dict(index_links_dict, expectation_suite_name, section_name, **kwargs)
        if section_name == "validations" and kwargs.get("run_id") is not None:
            entry = links["validations_links"][-1]
            if kwargs.get("validation_success"):
                entry["cxr_status"], entry["cxr_warnings"] = PASSED, 0
            else:
                validation = self.data_context.get_validation_result(
                    batch_identifier=kwargs.get("batch_identifier"),
                    expectation_suite_name=expectation_suite_name,
                    run_id=kwargs["run_id"],
                    validation_results_store_name=self.source_stores.get("validations"),
                )
                entry["cxr_status"], entry["cxr_warnings"] = (
                    validation_status(validation) if getattr(validation, "results", None) is not None else (FAILED, 0)
                )
        return links


class LevelledSiteIndexPageRenderer(SiteIndexPageRenderer):
    """GX's index page with the three-level status (icon and words) and a note on what they mean."""

    @classmethod
    def _generate_validation_results_link_table(cls, index_links_dict):
        table = super()._generate_validation_results_link_table(index_links_dict)
        for row, link in zip(table.table_data, index_links_dict.get("validations_links", [])):
            status = link.get("cxr_status") or (PASSED if link.get("validation_success") else FAILED)
            warnings = int(link.get("cxr_warnings") or 0)
            row["validation_success"] = _status_template(
                status, warnings, "$icon $words", classes=["ge-index-page-table-validation-links-item", "text-nowrap"]
            )
            row["_validation_success_text"] = status  # the column's filter: passed / passed with warnings / failed
        return table

    @classmethod
    def render(cls, index_links_dict):
        document = super().render(index_links_dict)
        note = TextContent(text=[LEVELS_NOTE], styling={"classes": ["col-12", "cxr-levels-note", "text-muted"]})
        if document is not None and document.sections:
            blocks = document.sections[0].content_blocks
            blocks.insert(1 if blocks else 0, note)
        return document


class LevelledValidationResultsPageRenderer(ValidationResultsPageRenderer):
    """GX's validation page whose overview says passed / passed with N warnings / failed."""

    @classmethod
    def _render_validation_header(cls, validation_results):
        header = super()._render_validation_header(validation_results)
        status, warnings = validation_status(validation_results)
        template = header.subheader.string_template
        icon = " ".join(ICONS[status])
        template["params"]["html_success_icon"] = f'<i class="{icon}" aria-hidden="true"></i>'
        template["params"]["success"] = status_words(status, warnings)
        if status == WARNINGS:
            template["template"] += "\n ${levels_note}"
            template["params"]["levels_note"] = (
                "Warnings are flag-level checks that failed: reported, they change nothing."
            )
        return header
