"""Scoring decoded images with a checkpoint: the one model-side code path of ``cxr predict``,
``cxr score`` (a Ray Data actor per replica) and a server.

``Scorer`` loads a checkpoint once (weights, ``model.json``, ``ood.npz`` when present, operating-point
thresholds when given) and then, per batch: ``decode`` turns file bytes into the checkpoint's input
pixels exactly as preprocessing did (``pipelines.imaging.decode_bytes`` at the checkpoint's
``image_size``), and ``score`` runs one forward pass that gives the probabilities and the
penultimate features the OOD score needs (``trainers.features.penultimate``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import UserInputError
from pipelines.imaging import decode_bytes
from pipelines.rundir import RunDir

OOD_COLUMNS = ("ood_score", "ood", "ood_intensity", "ood_features")


@dataclass(frozen=True)
class Thresholds:
    """Operating points chosen on a run's validation split by ``cxr evaluate`` (``eval/metrics.json``)."""

    values: dict[str, float]  # finding -> threshold (findings without one are left out)
    missing: list[str]  # findings of the checkpoint that have no threshold (no positive validation image)
    rule: str
    source: str  # the metrics.json they were read from

    def to_json(self) -> dict:
        return {"thresholds": self.values, "no_threshold": self.missing, "rule": self.rule, "chosen_on": "val",
                "source": self.source, "pred": "pred_<finding> = prob_<finding> >= threshold"}


def run_of_checkpoint(checkpoint: Path) -> RunDir | None:
    """The run whose ``train/best`` or ``tune/best`` ``checkpoint`` is, else None."""
    checkpoint = Path(checkpoint).resolve()
    run = RunDir(checkpoint.parent.parent)
    return run if checkpoint in (run.train_best, run.tune_best) else None


def read_thresholds(run: RunDir | None, checkpoint: Path, findings: list[str]) -> Thresholds | None:
    """The run's validation-chosen thresholds if ``cxr evaluate`` scored this very checkpoint; else None."""
    if run is None or not run.eval_metrics.is_file():
        return None
    metrics = json.loads(run.eval_metrics.read_text())
    if Path(metrics.get("checkpoint", "")).resolve() != Path(checkpoint).resolve():
        return None
    per_finding = metrics.get("per_finding", {})
    values = {f: float(per_finding[f]["threshold"]) for f in findings if (per_finding.get(f) or {}).get("threshold") is not None}
    return Thresholds(values, [f for f in findings if f not in values], metrics.get("operating_point", {}).get("rule", "youden"),
                      str(run.eval_metrics))


class Scorer:
    """A checkpoint loaded once: ``decode`` bytes, ``score`` uint8 batches. ``device`` e.g. ``cuda``."""

    def __init__(self, checkpoint: Path, thresholds: Thresholds | None = None, device: str | None = None) -> None:
        from trainers.checkpoint import load_checkpoint
        from trainers.ood import read_ood

        self.checkpoint = Path(checkpoint)
        self.model, self.info = load_checkpoint(self.checkpoint)
        if device:
            self.model.to(device)
        self.findings: list[str] = list(self.info["findings"])
        self.image_size = int(self.info["image_size"])
        self.ood, self.ood_note = read_ood(self.checkpoint)
        self.thresholds = thresholds

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        """``(S, S)`` uint8 pixels of an image file's bytes; DecodeError with the reason if it is not one."""
        return decode_bytes(data, self.image_size, name).pixels

    def columns(self) -> list[str]:
        """The columns ``score`` returns, in order."""
        preds = [f"pred_{f}" for f in self.findings if self.thresholds and f in self.thresholds.values]
        return [*(f"prob_{f}" for f in self.findings), *preds, *OOD_COLUMNS]

    def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per image of ``(n, S, S)`` uint8: ``prob_<finding>``, ``pred_<finding>`` (with thresholds),
        ``ood_score``/``ood``/``ood_intensity``/``ood_features`` (None where the checkpoint has no OOD
        statistics)."""
        from trainers.features import penultimate
        from trainers.ood import intensity_summary

        images = np.asarray(images, np.uint8)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise UserInputError(f"expected images of shape (n, {self.image_size}, {self.image_size}), got {images.shape}")
        probs, features = penultimate(self.model, self.info, images)
        out: dict[str, np.ndarray] = {f"prob_{f}": probs[:, j] for j, f in enumerate(self.findings)}
        if self.thresholds:
            out.update({f"pred_{f}": probs[:, j] >= self.thresholds.values[f]
                        for j, f in enumerate(self.findings) if f in self.thresholds.values})
        if self.ood is not None:
            out.update(self.ood.score(intensity_summary(images), features))
        else:
            out.update({c: np.full(len(images), None, dtype=object) for c in OOD_COLUMNS})
        return out
