"""Predict from a saved checkpoint on image files: no run directory, no Ray."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.imaging import Decoded, DecodeError, decode_file


def decode_all(paths: list[Path], image_size: int) -> list[Decoded]:
    """Decode files exactly as preprocessing does (``decode_file``), so the model sees the same
    pixels it was trained on. A file that cannot be decoded is an error that names it."""
    decoded = []
    for path in paths:
        try:
            decoded.append(decode_file(Path(path), image_size))
        except DecodeError as err:
            raise DecodeError(f"{path}: {err}", err.kind) from None
    return decoded


def decode_images(paths: list[Path], image_size: int) -> np.ndarray:
    """The decoded pixels ``(n, S, S)`` uint8 of ``paths``."""
    decoded = decode_all(paths, image_size)
    return np.stack([d.pixels for d in decoded]) if decoded else np.zeros((0, image_size, image_size), np.uint8)


def predict_images(checkpoint: Path, images: list[Path]) -> pd.DataFrame:
    """One row per image: ``image`` (the path), ``prob_<finding>`` for every finding of the
    checkpoint (sigmoid outputs: independent probabilities, they need not sum to 1) and the OOD
    fields (``evaluation.scoring``: null when the checkpoint has no OOD statistics). The frame's
    ``attrs["ood_note"]`` says how the OOD threshold was set, or why there is none."""
    from evaluation.scoring import Scorer

    scorer = Scorer(Path(checkpoint))
    scores = scorer.score(decode_images(images, scorer.image_size))
    frame = pd.DataFrame({"image": [str(p) for p in images], **scores})
    frame.attrs["ood_note"] = scorer.ood_note
    return frame


def _ood_line(row: pd.Series) -> str:
    if row.get("ood_score") is None or pd.isna(row.get("ood_score")):
        return "  out of distribution: unknown (the checkpoint has no OOD statistics)"
    verdict = "YES: unlike the training images, do not trust these probabilities" if row["ood"] else "no"
    return f"  out of distribution: {verdict} (ood_score {float(row['ood_score']):.2f}; flagged above 1)"


def format_predictions(frame: pd.DataFrame) -> str:
    """A terminal-friendly listing: per image, every finding with its probability, highest first,
    then its out-of-distribution line; the OOD threshold's note last."""
    blocks = []
    for _, row in frame.iterrows():
        probs = {c.removeprefix("prob_"): float(row[c]) for c in frame.columns if c.startswith("prob_")}
        width = max(map(len, probs), default=0)
        lines = [str(row["image"])]
        lines += [f"  {name:<{width}}  {p:.3f}" for name, p in sorted(probs.items(), key=lambda kv: -kv[1])]
        if "ood_score" in frame.columns:
            lines.append(_ood_line(row))
        blocks.append("\n".join(lines))
    note = frame.attrs.get("ood_note")
    return "\n\n".join(blocks) + (f"\n\n{note}" if note else "")
