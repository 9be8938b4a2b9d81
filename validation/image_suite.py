"""The image suite: per-image facts recorded during preprocessing, judged once per run by GX.

``image_checks`` is the cheap per-batch half that Ray Data's ``map_batches`` calls (no GX, numpy
only); ``validate_images`` runs the GX suite over the collected image table. Both use the same
thresholds below, so a flag set in a batch and a GX verdict never disagree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from validation.checks import Check
from validation.gx_runner import run_checks
from validation.results import SuiteResult

SUITE = "images"
IMAGE_COLUMNS = ("image_id", "decoded", "error", "orig_width", "orig_height", "orig_mode", "pixel_mean", "pixel_std", "clipped_frac")
# Pixel statistics are in 0..255 units of the resized 8-bit image. Real NIH radiographs measure mean
# 85..200, std 27..80, clipped fraction under 0.17, so these bounds catch only broken images.
MIN_MEAN, MAX_MEAN = 10.0, 245.0  # outside: blank (all black or all white)
MIN_STD = 2.0  # below: constant (one grey level)
MAX_CLIPPED_FRAC = 0.5  # above: saturated (most pixels at 0 or 255)
REJECT_FLAGS = ("is_blank", "is_constant", "is_saturated")  # quarantined; ``upsampled`` is only reported
MIN_SIDE = "orig_min_side"  # derived: the shorter original side, against the target size


def image_checks(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Add the per-image flags ``is_blank``, ``is_constant``, ``is_saturated``, ``upsampled`` to a
    batch that has the pixel statistics and original size (NaN statistics, from an image that did
    not decode, raise no flag: the decode check reports those)."""
    mean = np.asarray(batch["pixel_mean"], dtype=np.float64)
    std = np.asarray(batch["pixel_std"], dtype=np.float64)
    clipped = np.asarray(batch["clipped_frac"], dtype=np.float64)
    side = np.minimum(np.asarray(batch["orig_width"], dtype=np.float64), np.asarray(batch["orig_height"], dtype=np.float64))
    return {
        **batch,
        "is_blank": (mean < MIN_MEAN) | (mean > MAX_MEAN),
        "is_constant": std < MIN_STD,
        "is_saturated": clipped > MAX_CLIPPED_FRAC,
        "upsampled": side < image_size,
    }


def image_suite_checks(image_size: int) -> list[Check]:
    decoded = ("decoded", True)
    return [
        Check("ExpectTableColumnsToMatchSet", {"column_set": list(IMAGE_COLUMNS), "exact_match": False}, "image table columns", "table"),
        Check("ExpectColumnValuesToBeInSet", {"column": "decoded", "value_set": [True]}, "decoded: the file is a readable image"),
        *(Check("ExpectColumnValuesToNotBeNull", {"column": c}, f"{c}: recorded", where=decoded) for c in ("orig_width", "orig_height", "orig_mode")),
        Check("ExpectColumnValuesToBeBetween", {"column": "pixel_mean", "min_value": MIN_MEAN, "max_value": MAX_MEAN}, f"pixel_mean, {MIN_MEAN:g}..{MAX_MEAN:g}: not blank"),
        Check("ExpectColumnValuesToBeBetween", {"column": "pixel_std", "min_value": MIN_STD}, f"pixel_std, >= {MIN_STD:g}: not constant"),
        Check("ExpectColumnValuesToBeBetween", {"column": "clipped_frac", "max_value": MAX_CLIPPED_FRAC}, f"clipped_frac, <= {MAX_CLIPPED_FRAC:g}: not saturated"),
        Check("ExpectColumnValuesToBeBetween", {"column": MIN_SIDE, "min_value": image_size}, f"shorter side, >= {image_size}: else upsampled", "flag"),
    ]


def validate_images(images: pd.DataFrame, out_dir: Path, image_size: int) -> SuiteResult:
    """Run the image suite over one row per image; ``failed_rows`` are positions in ``images``
    (undecodable, blank, constant or saturated images); upsampled images are flagged only."""
    table = images.reset_index(drop=True)
    if {"orig_width", "orig_height"} <= set(table.columns):
        table = table.assign(**{MIN_SIDE: table[["orig_width", "orig_height"]].min(axis=1, skipna=False)})
    return run_checks(SUITE, table, image_suite_checks(image_size), out_dir)
