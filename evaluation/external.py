"""External validation sets beside the internal test split: where they live and, in words, when
one does clearly worse.

``cxr external`` writes each set's ``<run>/external/NAME/eval/metrics.json`` in the format of
``<run>/eval/metrics.json``; this module reads them back for the CLI summary and the report.
"""
from __future__ import annotations

import json

from pipelines.formatting import estimate, number
from pipelines.rundir import RunDir


def external_metrics(run: RunDir) -> dict[str, dict]:
    """Every scored external set of the run, by name (sets without ``eval/metrics.json`` are left out)."""
    if not run.externals.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in run.externals.iterdir() if p.is_dir() and not p.name.startswith(".")):  # not a staging folder
        path = RunDir(folder).eval_metrics
        if not path.is_file():
            continue
        try:
            found[folder.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable: the report shows what it can
    return found


def below_internal(name: str, external: dict, internal: dict | None) -> str | None:
    """One sentence when the external set's interval for the mean AUROC lies wholly below the
    internal test split's point estimate; None otherwise (or when either figure is undefined)."""
    ext, inside = external.get("mean", {}), (internal or {}).get("mean", {})
    point, high = inside.get("auroc"), ext.get("ci_high")
    if point is None or high is None or ext.get("auroc") is None or high >= point:
        return None
    return (f"On external set {name} ({external['n_images']} images, {external['n_patients']} patients) "
            f"the model's mean AUROC is {estimate(ext['auroc'], ext['ci_low'], high)}, well below "
            f"{number(point)} on the internal test split: it does not carry over to this collection as measured")
