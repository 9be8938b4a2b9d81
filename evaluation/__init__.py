"""Evaluation of a trained checkpoint: metrics with patient-bootstrap intervals, operating points,
calibration, robustness, subgroups, Grad-CAM with the pointing game, and the run's HTML report.

The names below are imported on first use, so ``import evaluation`` (and ``cxr --help``) does not
pay for torch and pytorch-grad-cam.
"""
from __future__ import annotations

from pipelines.lazy import lazy_exports

_EXPORTS = {
    "EvalResult": "evaluation.evaluate",
    "evaluate_run": "evaluation.evaluate",
    "ExplainResult": "evaluation.explanations",
    "explain": "evaluation.explanations",
    "explain_run": "evaluation.explanations",
    "predict_images": "evaluation.predict",
    "format_predictions": "evaluation.predict",
    "write_report": "evaluation.report",
}
__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
