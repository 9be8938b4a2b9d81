"""Source adapters: each turns one collection's label file into manifest rows plus rejects.

An adapter returns a ParsedSource: the rows it could read (manifest columns, ``path`` relative to
the image root) and the rows it could not, each with a reason. Checking files on disk is ingest's
job, not the adapter's.
"""
from __future__ import annotations

from pipelines.sources.base import ParsedSource, Reject
from pipelines.sources import chexpert, generic, nih
from pipelines.sources.chexpert import parse_chexpert
from pipelines.sources.generic import parse_manifest
from pipelines.sources.nih import parse_nih

ADAPTERS = {"nih": parse_nih, "chexpert": parse_chexpert, "manifest": parse_manifest}
# Where each source's labels come from and their known noise, in words (the model card says it).
LABEL_NOTES = {"nih": nih.LABEL_NOTE, "chexpert": chexpert.LABEL_NOTE, "manifest": generic.LABEL_NOTE}

__all__ = ["ADAPTERS", "LABEL_NOTES", "ParsedSource", "Reject", "parse_chexpert", "parse_manifest", "parse_nih"]
