"""The pixel side of EDA: a small sample of images as per-image 8-bit histograms plus display copies.

An image is kept as its histogram (fraction of pixels at each of the 256 levels) rather than its
pixels: means, standard deviations and standardized distributions all follow exactly from the
histograms, every image weighs the same whatever its size (as in ``stats.json``), and a sample of
full-resolution X-rays costs kilobytes of memory instead of megabytes per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from pipelines.imaging import to_grayscale
from pipelines.shards import IMAGE_COLUMN, SPLITS, images_from_column, split_dir

LEVELS = 256
DISPLAY_SIZE = 256  # longest side of the copies kept for the example grid and the single image


@dataclass
class PixelSample:
    """Images read for EDA; ``splits`` holds None where the image has no split."""

    source: str  # "shards" or "disk"
    image_ids: list[str] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    hists: list[np.ndarray] = field(default_factory=list)  # (256,) fractions of pixels
    images: list[np.ndarray] = field(default_factory=list)  # uint8, longest side <= DISPLAY_SIZE
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)

    def __len__(self) -> int:
        return len(self.image_ids)

    def add(self, image_id: str, split: str | None, pixels: np.ndarray) -> None:
        self.image_ids.append(image_id)
        self.splits.append(split)
        self.hists.append(np.bincount(pixels.ravel(), minlength=LEVELS) / pixels.size)
        self.images.append(_display_copy(pixels))


def _display_copy(pixels: np.ndarray) -> np.ndarray:
    if max(pixels.shape) <= DISPLAY_SIZE:
        return pixels
    image = Image.fromarray(pixels)
    image.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE), Image.BILINEAR)
    return np.asarray(image)


def read_gray8(path: Path) -> np.ndarray:
    """A file on disk as full-resolution 8-bit grayscale, converted the way preprocessing does it
    (16-bit scaled by its bit depth, RGBA composited on black)."""
    with Image.open(path) as opened:
        opened.load()
        return np.asarray(to_grayscale(opened), dtype=np.uint8)


def read_disk_sample(rows: pd.DataFrame, images_root: Path, limit: int | None = None) -> PixelSample:
    """Read ``rows`` (``image_id``, ``path``, optional ``split``) from disk in order, until ``limit``
    images are read.

    Missing or unreadable files are skipped and recorded with the reason, so EDA still runs on a
    collection with holes and says how many.
    """
    sample = PixelSample(source="disk")
    splits = rows["split"] if "split" in rows.columns else pd.Series(pd.NA, index=rows.index)
    for image_id, rel, split in zip(rows["image_id"], rows["path"], splits):
        if limit is not None and len(sample) >= limit:
            break
        try:
            pixels = read_gray8(Path(images_root) / str(rel))
        except FileNotFoundError:
            sample.skipped.append((str(image_id), "missing file"))
            continue
        except (OSError, ValueError, SyntaxError) as err:
            sample.skipped.append((str(image_id), f"unreadable: {err}"))
            continue
        sample.add(str(image_id), None if pd.isna(split) else str(split), pixels)
    return sample


def _shard_files(shards: Path) -> list[tuple[Path, str]]:
    """Every shard file of the train/val/test partitions (not preprocess's failure partition), with its split."""
    return [(f, split) for split in SPLITS for f in sorted(split_dir(shards, split).glob("*.parquet"))]


def read_shard_sample(shards: Path, n: int, seed: int) -> PixelSample:
    """``n`` rows drawn uniformly from all shards, reading only the row groups that hold them and
    only the ``image_id`` and ``image`` columns (a full shard set is gigabytes)."""
    files = _shard_files(shards)
    if not files:
        raise FileNotFoundError(f"no shards under {shards}: run `cxr preprocess --run DIR` first")
    parquet = [pq.ParquetFile(f) for f, _ in files]
    counts = np.array([p.metadata.num_rows for p in parquet])
    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(int(starts[-1]), size=min(n, int(starts[-1])), replace=False))
    sample = PixelSample(source="shards")
    for i, (pf, (_, split)) in enumerate(zip(parquet, files)):
        local = picked[(picked >= starts[i]) & (picked < starts[i + 1])] - starts[i]
        if not len(local):
            continue
        group_rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        group_starts = np.concatenate([[0], np.cumsum(group_rows)])
        group_of = np.searchsorted(group_starts, local, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist(), columns=["image_id", IMAGE_COLUMN])
        # Position of each wanted row in the concatenation of the row groups that were read.
        read_starts = dict(zip(groups, np.concatenate([[0], np.cumsum([group_rows[g] for g in groups])])))
        positions = [int(row - group_starts[g] + read_starts[g]) for row, g in zip(local, group_of)]
        taken = table.take(positions)
        column = taken.column(IMAGE_COLUMN).to_pylist()
        size = int(round(len(column[0]) ** 0.5))
        for image_id, pixels in zip(taken.column("image_id").to_pylist(), images_from_column(column, size)):
            sample.add(str(image_id), split, pixels)
    return sample


def moments(hist: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (0..255 units) of a histogram over the 256 levels."""
    levels = np.arange(LEVELS)
    mean = float(hist @ levels)
    return mean, float(np.sqrt(max(float(hist @ levels**2) - mean**2, 0.0)))


def pooled(hists: list[np.ndarray]) -> np.ndarray:
    """The histogram of all pixels of several images, each image weighing the same."""
    return np.mean(np.stack(hists), axis=0)


def standardized_moments(hist: np.ndarray, mean01: float, std01: float) -> tuple[float, float]:
    """Mean and std of ``(x / 255 - mean01) / std01`` over a histogram: what the model sees."""
    mean, std = moments(hist)
    return (mean / 255.0 - mean01) / std01, std / 255.0 / std01


def standardized_edges(mean01: float, std01: float) -> np.ndarray:
    """Bin edges of the 256 levels after standardization, for drawing the histogram on that axis."""
    return ((np.arange(LEVELS + 1) - 0.5) / 255.0 - mean01) / std01
