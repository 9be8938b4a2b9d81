"""The pointing game: does a finding's heatmap peak inside the radiologist's box for it?

Compared with a random-point baseline: a point drawn uniformly over the image lands in a box with
probability (box area / image area), so the baseline's expected hit rate is the mean of that over
the same boxes. It is exact, not a noisy draw, and large boxes (a heart) score high by chance.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

NIH_BOX_FRAME = 1024  # NIH's boxes are in pixels of the 1024x1024 release, whatever the file's size
# The strict game counts a peak inside the box. Zhang et al. (2016), who defined the game, count a
# peak within 15 pixels of a 224-pixel image's box: a last-stage heatmap is 7x7, so its peak is
# placed only to within a cell. Both are reported; the tolerance is a fraction of the side
# so it means the same at every image size, and each baseline uses the same box as its hit rate.
TOLERANCE = 15 / 224


def box_to_model(x: float, y: float, w: float, h: float, frame_w: float, frame_h: float,
                 size: int) -> tuple[float, float, float, float]:
    """A box given in a ``frame_w`` x ``frame_h`` frame -> (x0, y0, x1, y1) in the model's
    ``size`` x ``size`` input (decoding stretches the image to a square, so do the boxes)."""
    sx, sy = size / frame_w, size / frame_h
    return x * sx, y * sy, (x + w) * sx, (y + h) * sy


def expand(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return x0 - margin, y0 - margin, x1 + margin, y1 + margin


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


def play(heatmap: np.ndarray, box: tuple[float, float, float, float], tolerance: float) -> dict:
    """One boxed finding: the peak, whether it hits the box (strictly, and within ``tolerance`` x
    the side), and the random point's chance of each."""
    size = heatmap.shape[-1]
    point = peak(heatmap)
    wide = expand(box, tolerance * size)
    return {"peak_x": point[0], "peak_y": point[1], "hit": inside(point, box), "baseline": chance(box, size),
            "hit_tolerant": inside(point, wide), "baseline_tolerant": chance(wide, size)}


def summarize(rows: pd.DataFrame) -> dict:
    """Hit rate and random baseline, strict and with tolerance, overall and per finding, from rows
    made by ``play`` (plus ``finding``)."""
    def figures(part: pd.DataFrame) -> dict:
        return {"n": int(len(part)), "hits": int(part["hit"].sum()),
                "hit_rate": float(part["hit"].mean()), "baseline": float(part["baseline"].mean()),
                "hit_rate_tolerant": float(part["hit_tolerant"].mean()),
                "baseline_tolerant": float(part["baseline_tolerant"].mean())}

    return {**figures(rows), "per_finding": {f: figures(part) for f, part in rows.groupby("finding", sort=True)}}
