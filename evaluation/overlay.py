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
HEAT_ALPHA = 0.42
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


def _heat(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap through the jet colour map (red = strongest), ``PANEL`` x ``PANEL`` RGB."""
    resized = Image.fromarray(np.clip(heatmap, 0, 1).astype(np.float32), mode="F").resize((PANEL, PANEL), Image.BILINEAR)
    return colormaps["jet"](np.asarray(resized))[:, :, :3].astype(np.float32)


def _overlay(image: np.ndarray, panel: Panel, scale: float) -> Image.Image:
    blended = (1 - HEAT_ALPHA) * _gray(image) + HEAT_ALPHA * _heat(panel.heatmap)
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
    """Write the original and one overlay per panel side by side, each under its caption."""
    scale = PANEL / image.shape[-1]
    tiles = [("image", "as the model sees it", Image.fromarray((_gray(image) * 255).astype(np.uint8)))]
    tiles += [(p.finding.replace("_", " "), p.caption, _overlay(image, p, scale)) for p in panels]
    head, caption_h = 26, 42
    width = len(tiles) * PANEL + (len(tiles) + 1) * GAP
    canvas = Image.new("RGB", (width, head + caption_h + PANEL + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 6), title, fill=MUTED, font=_font(13))
    for k, (name, caption, tile) in enumerate(tiles):
        x = GAP + k * (PANEL + GAP)
        draw.text((x, head), name, fill=INK, font=_font(15))
        draw.text((x, head + 19), caption, fill=MUTED, font=_font(12))
        canvas.paste(tile, (x, head + caption_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=False)
    return path
