"""Training-split augmentation, batched on the worker's device (the GPU when there is one).

One random affine per image (small rotation, shift, zoom) and a contrast change. Horizontal flips
are optional and off by default; vertical flips are not offered: an upside-down chest is not an
image the model will ever be asked about.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    rotate_deg: float = 7.0
    shift: float = 0.05  # fraction of the side
    scale: float = 0.1  # zoom factor in [1 - scale, 1 + scale]
    contrast: float = 0.2  # factor in [1 - contrast, 1 + contrast] around each image's mean
    hflip: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Augment | None":
        """None when augmentation is off (``cfg`` is a TrainConfig)."""
        if not cfg.augment:
            return None
        return cls(cfg.rotate_deg, cfg.shift, cfg.scale, cfg.contrast, cfg.hflip)


def _symmetric(n: int, half_width: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * half_width


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """``x``: ``(n, 1, H, W)`` float in [0, 1]. Random numbers come from ``generator`` (CPU), so an
    epoch's augmentations are reproducible from its seed; the warp runs on ``x``'s device."""
    n = x.shape[0]
    angle = _symmetric(n, math.radians(aug.rotate_deg), generator)
    zoom = 1 + _symmetric(n, aug.scale, generator)
    shift = _symmetric(2 * n, 2 * aug.shift, generator).view(n, 2)  # normalized coordinates span 2
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output coordinates to input ones, so zooming in by `zoom` divides by it.
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    factor = (1 + _symmetric(n, aug.contrast, generator)).to(x.device, x.dtype).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp_(0.0, 1.0)
