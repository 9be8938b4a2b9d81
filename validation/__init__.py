"""Great Expectations suites for the manifest, the splits and the preprocessed images; their
Data Docs and summary; quarantine of failing records. GX itself is imported only when a suite runs."""
from validation.image_suite import REJECT_FLAGS, image_checks, validate_images
from validation.manifest_suite import validate_manifest
from validation.quarantine import drop_failed, quarantine_from
from validation.report import format_summary, write_summary
from validation.results import ExpectationOutcome, SuiteResult, ValidationFailed, raise_on_table_failures
from validation.split_suite import validate_splits

__all__ = [
    "REJECT_FLAGS",
    "ExpectationOutcome",
    "SuiteResult",
    "ValidationFailed",
    "drop_failed",
    "format_summary",
    "image_checks",
    "quarantine_from",
    "raise_on_table_failures",
    "validate_images",
    "validate_manifest",
    "validate_splits",
    "write_summary",
]
