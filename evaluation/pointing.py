"""The pointing game: does a finding's heatmap peak inside the radiologist's box for it?

Compared with a random-point baseline: a point drawn uniformly over the image lands in a box with
probability (box area / image area), so the baseline's expected hit rate is the mean of that over
the same boxes. It is exact, not a noisy draw, and large boxes (a heart) score high by chance.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

NIH_BOX_FRAME = 1024  # NIH's boxes are in pixels of the 1024x1024 release, whatever the file's size


def box_to_model(x: float, y: float, w: float, h: float, frame_w: float, frame_h: float,
                 size: int) -> tuple[float, float, float, float]:
    """A box given in a ``frame_w`` x ``frame_h`` frame -> (x0, y0, x1, y1) in the model's
    ``size`` x ``size`` input (decoding stretches the image to a square, so do the boxes)."""
    sx, sy = size / frame_w, size / frame_h
    return x * sx, y * sy, (x + w) * sx, (y + h) * sy


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the heatmap's maximum, at the centre of its pixel (the first, if tied)."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return col + 0.5, row + 0.5


def inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


def chance(box: tuple[float, float, float, float], size: int) -> float:
    """Probability that a uniformly random point of a ``size`` x ``size`` image is in ``box``
    (the part of the box inside the image)."""
    x0, y0, x1, y1 = (min(max(v, 0.0), float(size)) for v in box)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / float(size * size)


def summarize(rows: pd.DataFrame) -> dict:
    """Hit rate and baseline overall and per finding, from rows with ``finding``, ``hit``,
    ``baseline``."""
    def figures(part: pd.DataFrame) -> dict:
        return {"n": int(len(part)), "hits": int(part["hit"].sum()),
                "hit_rate": float(part["hit"].mean()) if len(part) else None,
                "baseline": float(part["baseline"].mean()) if len(part) else None}

    return {**figures(rows), "per_finding": {f: figures(part) for f, part in rows.groupby("finding", sort=True)}}
