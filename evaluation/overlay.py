"""One PNG per explained image: the radiograph as it is, then one Grad-CAM overlay per finding
with the radiologist's box (green) and the heatmap's peak (white cross) where there is a box.

Drawn with Pillow and a colour-map lookup table rather than a matplotlib figure per image: a run
explains dozens to hundreds of images, and a figure costs about a second each on a small CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

PANEL = 256  # displayed side of each panel, in pixels
GAP = 8
COLUMNS = 4  # panels per row
HEAT_ALPHA = (0.12, 0.5)  # overlay opacity where the heatmap is 0 and where it is 1: the anatomy stays visible
BOX_COLOR = (57, 255, 20)
INK = (29, 39, 51)
MUTED = (91, 102, 117)


@dataclass(frozen=True)
class Panel:
    finding: str
    heatmap: np.ndarray  # (S, S) in [0, 1]
    caption: str  # e.g. "p 0.831 (threshold 0.412)"
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in model pixels
    peak: tuple[float, float] | None = None


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _gray(image: np.ndarray) -> np.ndarray:
    """The radiograph as ``PANEL`` x ``PANEL`` float RGB in [0, 1]."""
    resized = Image.fromarray(image).resize((PANEL, PANEL), Image.BILINEAR)
    return np.repeat(np.asarray(resized, np.float32)[:, :, None] / 255.0, 3, axis=2)


def _heat(heatmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap at ``PANEL`` x ``PANEL``: through the jet colour map (RGB, red = strongest), and
    its level in [0, 1]."""
    resized = Image.fromarray(np.clip(heatmap, 0, 1).astype(np.float32), mode="F").resize((PANEL, PANEL), Image.BILINEAR)
    level = np.clip(np.asarray(resized), 0, 1)
    return colormaps["jet"](level)[:, :, :3].astype(np.float32), level


def _overlay(image: np.ndarray, panel: Panel, scale: float) -> Image.Image:
    heat, level = _heat(panel.heatmap)
    alpha = (HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * level)[:, :, None]
    blended = (1 - alpha) * _gray(image) + alpha * heat
    out = Image.fromarray((blended * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if panel.box is not None:
        x0, y0, x1, y1 = (v * scale for v in panel.box)
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOR, width=2)
    if panel.peak is not None:
        x, y = panel.peak[0] * scale, panel.peak[1] * scale
        draw.line((x - 9, y, x + 9, y), fill="white", width=3)
        draw.line((x, y - 9, x, y + 9), fill="white", width=3)
    return out


def render(image: np.ndarray, panels: list[Panel], title: str, path: Path) -> Path:
    """Write the original and one overlay per panel, each under its caption, ``COLUMNS`` a row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compose(image, panels, title).save(path)
    return path


def compose(image: np.ndarray, panels: list[Panel], title: str) -> Image.Image:
    """The picture ``render`` writes, in memory (a server sends it as PNG bytes)."""
    scale = PANEL / image.shape[-1]
    tiles = [("image", "as the model sees it", Image.fromarray((_gray(image) * 255).astype(np.uint8)))]
    tiles += [(p.finding.replace("_", " "), p.caption, _overlay(image, p, scale)) for p in panels]
    head, caption_h = 26, 42
    columns = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = PANEL + GAP, caption_h + PANEL + GAP
    canvas = Image.new("RGB", (columns * cell_w + GAP, head + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 6), title, fill=MUTED, font=_font(13))
    for k, (name, caption, tile) in enumerate(tiles):
        x, y = GAP + (k % columns) * cell_w, head + (k // columns) * cell_h
        draw.text((x, y), name, fill=INK, font=_font(15))
        draw.text((x, y + 19), caption, fill=MUTED, font=_font(12))
        canvas.paste(tile, (x, y + caption_h))
    return canvas
