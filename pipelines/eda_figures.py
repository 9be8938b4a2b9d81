"""EDA figures, one function per figure, each writing a PNG.

Uses matplotlib's object API (``Figure`` without pyplot): no display, no global figure state, safe
to call from any process.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipelines.eda_pixels import LEVELS, moments, standardized_edges, standardized_moments

DPI = 110
SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
OTHER_COLORS = ("#9467bd", "#8c564b", "#7f7f7f")


def _new(width: float, height: float, ncols: int = 1, nrows: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def message(title: str, text: str, path: Path) -> Path:
    """A small figure that says why a figure has nothing to show, so every link in the summary works."""
    fig, axes = _new(8, 2)
    axes[0, 0].set_axis_off()
    axes[0, 0].text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#666666")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def split_color(name: str, index: int) -> str:
    return SPLIT_COLORS.get(name, OTHER_COLORS[index % len(OTHER_COLORS)])


def prevalence(counts: pd.DataFrame, no_finding: int, n_images: int, path: Path) -> Path:
    """Horizontal bars, most frequent finding on top; uncertain labels stacked where present.

    ``counts`` has index = finding, columns ``positive`` and ``uncertain``.
    """
    order = counts.sort_values("positive", ascending=True)
    names = [*order.index, "No Finding"]
    positive = [*order["positive"], no_finding]
    uncertain = [*order["uncertain"], 0]
    y = np.arange(len(names))
    fig, axes = _new(9, 6.5)
    ax = axes[0, 0]
    colors = ["#4c72b0"] * len(order) + ["#8c8c8c"]
    ax.barh(y, positive, color=colors, label="positive")
    if any(uncertain):
        ax.barh(y, uncertain, left=positive, color="#dd8452", hatch="//", edgecolor="white", label="uncertain (-1)")
        ax.legend(loc="lower right", frameon=False)
    top = max([p + u for p, u in zip(positive, uncertain)] + [1])
    for yi, p, u in zip(y, positive, uncertain):
        text = f"{p:,} ({100 * p / n_images:.1f}%)" + (f" + {u:,} uncertain" if u else "")
        ax.text(p + u + top * 0.01, yi, text, va="center", fontsize=8)
    ax.set_yticks(y, [n.replace("_", " ") for n in names])
    ax.set_xlim(0, top * 1.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("images")
    ax.set_title(f"Label prevalence ({n_images:,} images)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.axhline(len(order) - 0.5, color="#cccccc", linewidth=0.8)
    return _save(fig, path)


def cooccurrence(matrix: pd.DataFrame, path: Path) -> Path:
    """Counts of images positive for both findings. The colour scale ignores the diagonal (the
    prevalence, shown in grey), so the off-diagonal pattern stays visible."""
    values = matrix.to_numpy()
    n = len(values)
    off = values[~np.eye(n, dtype=bool)]
    vmax = max(int(off.max()) if off.size else 0, 1)
    cmap = colormaps["Blues"].with_extremes(bad="#e0e0e0")
    fig, axes = _new(9.5, 8)
    ax = axes[0, 0]
    image = ax.imshow(np.ma.masked_array(values, np.eye(n, dtype=bool)), cmap=cmap, vmin=0, vmax=vmax)
    for i in range(n):
        for j in range(n):
            v = int(values[i, j])
            dark = i != j and v > 0.6 * vmax
            ax.text(j, i, f"{v:,}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black", fontweight="bold" if i == j else "normal")
    labels = [name.replace("_", " ") for name in matrix.index]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set_title("Label co-occurrence (images positive for both; diagonal = positives)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images (off-diagonal)")
    return _save(fig, path)


def images_per_patient(per_patient: pd.Series, path: Path) -> Path:
    """Histogram of images per patient: integer bins, log scale when the tail is long."""
    counts = per_patient.to_numpy()
    top = int(counts.max())
    bins = np.arange(0.5, top + 1.5) if top <= 40 else np.linspace(0.5, top + 0.5, 41)
    fig, axes = _new(8, 4.5)
    ax = axes[0, 0]
    heights, _, bars = ax.hist(counts, bins=bins, color="#4c72b0", edgecolor="white")
    long_tail = top > 20
    if long_tail:
        ax.set_yscale("log")
    else:  # few bars: label each, so the tail of 1-2 patients is readable on a linear axis
        ax.set_xticks(range(1, top + 1))
        ax.bar_label(bars, labels=[f"{int(h):,}" if h else "" for h in heights], fontsize=8, padding=2)
    ax.set_xlabel("images per patient")
    ax.set_ylabel("patients (log scale)" if long_tail else "patients")
    if not long_tail:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(y=0.08)
    several = int((counts > 1).sum())
    fig.suptitle("Images per patient", fontsize=12)
    ax.set_title(f"{plural(len(counts), 'patient')}, {several:,} with more than one image, at most "
                 f"{plural(top, 'image')} each", fontsize=9, color="#555555")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def split_labels(percent: pd.DataFrame, sizes: pd.Series, path: Path) -> Path:
    """Grouped horizontal bars: % of each split's images positive per finding (comparable across
    splits of different size). ``percent`` has index = finding, one column per split."""
    names = list(percent.index)
    k = len(percent.columns)
    height = 0.8 / k
    y = np.arange(len(names))
    fig, axes = _new(9, 0.45 * len(names) + 1.5)
    ax = axes[0, 0]
    for i, split in enumerate(percent.columns):
        ax.barh(y - 0.4 + height * (i + 0.5), percent[split], height=height,
                color=split_color(split, i), label=f"{split} ({plural(int(sizes[split]), 'image')})")
    ax.set_yticks(y, [n.replace("_", " ") for n in names])
    ax.invert_yaxis()
    if names[-1] == "No Finding":
        ax.axhline(len(names) - 1.5, color="#cccccc", linewidth=0.8)
    ax.set_xlabel("% of the split's images")
    ax.set_title("Label distribution per split")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def examples(images: list[np.ndarray], titles: list[str], captions: list[str], path: Path,
             rows: int = 3, cols: int = 4) -> Path:
    """A grid of example images, titled with their findings."""
    if not images:
        return message("Example images", "No image could be read", path)
    rows = min(rows, math.ceil(len(images) / cols))
    fig, axes = _new(3 * cols, 3.5 * rows + 0.4, ncols=cols, nrows=rows)
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(images):
            ax.set_axis_off()
            continue
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
        ax.set_title(textwrap.fill(titles[k], 30), fontsize=9)
        ax.set_xlabel(captions[k], fontsize=7, color="#666666")
    fig.suptitle("Example images with their labels", fontsize=13)
    return _save(fig, path)


def _hist(ax, hist: np.ndarray, edges: np.ndarray, color: str, label: str, fill: bool = True) -> None:
    ax.stairs(100 * hist, edges, fill=fill, color=color, alpha=0.75 if fill else 1.0, label=label,
              linewidth=1.5)


def _cap_extremes(ax, hists: list[np.ndarray], edges: np.ndarray) -> None:
    """Black borders and burnt-in white text pile pixels at levels 0 and 255; a spike there would
    flatten the rest of the histogram, so the y axis stops above the other levels and the spike's
    height is written beside it."""
    cap = 1.3 * 100 * max(float(h[1:-1].max()) for h in hists)
    spikes = [(level, 100 * max(float(h[level]) for h in hists)) for level in (0, -1)]
    if cap <= 0 or all(height <= cap for _, height in spikes):
        return
    ax.set_ylim(0, cap)
    for level, height in spikes:
        if height > cap:
            x = edges[0] if level == 0 else edges[-1]
            ax.annotate(f"{height:.1f}% at {0 if level == 0 else 255}", (x, cap), xytext=(4 if level == 0 else -4, -12),
                        textcoords="offset points", ha="left" if level == 0 else "right", fontsize=8, color="#c44e52")


def intensity(image: np.ndarray | None, single: np.ndarray | None, sample: np.ndarray | None, n: int,
              source: str, path: Path) -> Path:
    """Raw 8-bit intensities: one image, its histogram, and the pooled histogram of the sample."""
    if image is None or single is None or sample is None:
        return message("Before standardization", "No image could be read", path)
    fig, axes = _new(15, 4.3, ncols=3)
    edges = np.arange(LEVELS + 1) - 0.5
    ax_img, ax_one, ax_all = axes[0]
    ax_img.set_axis_off()
    ax_img.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax_img.set_title("One image")
    for ax, hist, title in ((ax_one, single, "Pixel intensities of that image"),
                            (ax_all, sample, f"Pixel intensities of {plural(n, 'sampled image')}")):
        mean, std = moments(hist)
        _hist(ax, hist, edges, "#4c72b0", f"mean {mean:.1f}, std {std:.1f}")
        ax.axvline(mean, color="#c44e52", linestyle="--", linewidth=1)
        _cap_extremes(ax, [hist], edges)
        ax.set_xlim(-1, 256)
        ax.set_xlabel("pixel intensity (0-255)")
        ax.set_ylabel("% of pixels")
        ax.set_title(title)
        ax.legend(loc="upper right", frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"Before standardization ({source})", fontsize=12)
    return _save(fig, path)


def standardized(single: np.ndarray | None, groups: dict[str, tuple[np.ndarray, int]], mean01: float | None,
                 std01: float | None, stats_note: str, path: Path) -> Path:
    """Standardized intensities ``(x/255 - mean) / std``: one image, and the sample per split."""
    if single is None or mean01 is None or std01 is None:
        return message("After standardization", f"Not standardized: {stats_note}", path)
    fig, axes = _new(13, 4.5, ncols=2)
    ax_one, ax_all = axes[0]
    edges = standardized_edges(mean01, std01)
    m, s = standardized_moments(single, mean01, std01)
    _hist(ax_one, single, edges, "#4c72b0", f"mean {m:.2f}, std {s:.2f}")
    ax_one.set_title("One image, standardized")
    for i, (name, (hist, n)) in enumerate(groups.items()):
        m, s = standardized_moments(hist, mean01, std01)
        label = f"{name} ({plural(n, 'image')}): mean {m:.2f}, std {s:.2f}"
        _hist(ax_all, hist, edges, split_color(name, i), label, fill=False)
    ax_all.set_title("Sampled images, standardized")
    _cap_extremes(ax_one, [single], edges)
    _cap_extremes(ax_all, [h for h, _ in groups.values()], edges)
    for ax in (ax_one, ax_all):
        ax.axvline(0, color="#444444", linestyle=":", linewidth=1)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("standardized intensity (x/255 - mean) / std")
        ax.set_ylabel("% of pixels")
        ax.legend(loc="upper right", frameon=False, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"After standardization with mean {mean01:.4f}, std {std01:.4f} ({stats_note})", fontsize=12)
    return _save(fig, path)
