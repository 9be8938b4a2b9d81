"""Robustness: the test images degraded at increasing strength, and the model's AUROC on each.

Each perturbation mimics something that happens to real radiographs (detector noise, exposure
and windowing, motion blur, patient rotation, lossy archiving, low-resolution sources). Level 0
is the clean image; levels 1-4 grow stronger. Strengths are relative to the image (blur in % of
its side) so a 64-pixel test run and a 224-pixel real run are degraded alike.

The study streams: for each (perturbation, level) the test images are perturbed and scored
``CHUNK`` at a time, so besides the one copy of the clean test pixels at most one chunk of
perturbed pixels exists at any moment, whatever the size of the test split. Chunk ``k`` (images
``k * CHUNK`` to ``(k + 1) * CHUNK - 1`` in the split's order) draws its random numbers from
:func:`chunk_rng` ``(seed, perturbation, level, k)``, so an image's perturbed pixels depend on the
seed, its chunk's images and the chunk's index, not on how many images come after it. ``CHUNK`` is
a constant for that reason: changing it changes which noise each image gets (the deterministic
perturbations are unaffected).
"""
from __future__ import annotations

import io
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from evaluation.metrics import auroc

Perturb = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
CHUNK = 256  # images perturbed and scored at a time (also fixes each image's random numbers: see above)


def _per_image(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(img)), dtype=np.uint8) for img in images])


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive noise, ``sigma`` in grey levels (0..255)."""
    return np.clip(images + rng.normal(0.0, sigma, images.shape), 0, 255).round().astype(np.uint8)


def contrast(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast scaled by ``factor`` (< 1 flattens) around each image's mean grey level."""
    mean = images.reshape(len(images), -1).mean(axis=1)[:, None, None]
    return np.clip(mean + factor * (images - mean), 0, 255).round().astype(np.uint8)


def brightness(images: np.ndarray, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Every pixel ``offset`` grey levels brighter (over-exposure; bright areas clip at 255)."""
    return np.clip(images.astype(np.float64) + offset, 0, 255).round().astype(np.uint8)


def blur(images: np.ndarray, percent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with sigma = ``percent`` % of the image side (exact, also below a pixel)."""
    sigma = percent / 100.0 * images.shape[-1]
    smooth = gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma), mode="nearest")
    return np.clip(smooth, 0, 255).round().astype(np.uint8)


def rotation(images: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotated by ``degrees`` (counter-clockwise) about the centre; the corners fill black."""
    return _per_image(images, lambda im: im.rotate(degrees, resample=Image.BILINEAR, fillcolor=0))


def jpeg(images: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """Saved and re-read as JPEG at ``quality`` (100 best, lower loses more detail)."""
    def roundtrip(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")
    return _per_image(images, roundtrip)


def downscale(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Shrunk to ``factor`` of the side and enlarged back: the detail of a low-resolution source."""
    side = images.shape[-1]
    small = max(2, int(round(side * factor)))
    return _per_image(images, lambda im: im.resize((small, small), Image.BILINEAR, reducing_gap=3.0)
                      .resize((side, side), Image.BILINEAR))


@dataclass(frozen=True)
class Perturbation:
    name: str
    label: str  # for the report's axis: what the strength is measured in
    apply: Perturb
    strengths: tuple[float, ...]  # levels 1..n, weakest first
    clean: float = 0.0  # the strength that leaves an image unchanged (level 0)


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("noise", "Gaussian noise, σ in grey levels", gaussian_noise, (4, 8, 16, 32)),
    Perturbation("contrast", "contrast factor", contrast, (0.85, 0.7, 0.5, 0.3), clean=1.0),
    Perturbation("brightness", "brightness offset, grey levels", brightness, (15, 30, 50, 80)),
    Perturbation("blur", "Gaussian blur, σ in % of image side", blur, (0.5, 1.0, 2.0, 4.0)),
    Perturbation("rotation", "rotation, degrees", rotation, (3, 6, 10, 15)),
    Perturbation("jpeg", "JPEG quality", jpeg, (80, 50, 30, 10), clean=100.0),
    Perturbation("downscale", "resolution kept, fraction of side", downscale, (0.75, 0.5, 0.33, 0.25), clean=1.0),
)
BY_NAME = {p.name: p for p in PERTURBATIONS}


def chunk_rng(seed: int, name: str, level: int, chunk: int) -> np.random.Generator:
    """The random numbers of chunk ``chunk`` under perturbation ``name`` at ``level``: seeded by all
    four (the name through a stable CRC-32, so adding a perturbation changes no other's draws)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), level, chunk])


def perturb(images: np.ndarray, name: str, level: int, seed: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """``images`` degraded by perturbation ``name`` at ``level`` (0 = unchanged), drawing from
    ``rng`` (default: one seeded by ``seed`` and ``level``)."""
    if name not in BY_NAME:
        raise ValueError(f"unknown perturbation {name!r}: choose one of {', '.join(BY_NAME)}")
    spec = BY_NAME[name]
    if not 0 <= level <= len(spec.strengths):
        raise ValueError(f"level must be 0..{len(spec.strengths)} for {name}, got {level}")
    if level == 0:
        return images
    return spec.apply(images, spec.strengths[level - 1], rng if rng is not None else np.random.default_rng([seed, level]))


def perturbed_chunks(images: np.ndarray, name: str, level: int, seed: int = 0, chunk: int = CHUNK):
    """``images`` perturbed ``chunk`` at a time (each with :func:`chunk_rng`), in order: one
    chunk of perturbed pixels at a time, never a perturbed copy of the whole array."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    for k, start in enumerate(range(0, len(images), chunk)):
        yield perturb(images[start:start + chunk], name, level, rng=chunk_rng(seed, name, level, k))


def predict_perturbed(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, name: str, level: int,
                      seed: int = 0, chunk: int = CHUNK) -> np.ndarray:
    """``predict`` of every image perturbed by ``name`` at ``level`` (level 0: the images as they
    are), streamed chunk by chunk; rows in the order of ``images``."""
    parts = [predict(batch) for batch in perturbed_chunks(images, name, level, seed, chunk)]
    return np.concatenate(parts) if parts else predict(images[:0])


def _aurocs(labels: np.ndarray, probs: np.ndarray, findings: list[str]) -> dict[str, float]:
    return {f"auroc_{f}": auroc(labels[:, j], probs[:, j]) for j, f in enumerate(findings)}


def robustness_table(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
                     findings: list[str], seed: int = 0, clean_probs: np.ndarray | None = None,
                     chunk: int = CHUNK, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per (perturbation, level): ``strength``, ``mean_auroc`` (over findings defined on
    the clean test set) and ``auroc_<finding>``. ``predict`` maps uint8 images to probabilities;
    it is called with at most ``chunk`` images at a time (see the module's note on streaming).
    ``progress`` gets one line per perturbed level as it ends: on a large test split each level
    scores every image again, minutes apiece on a few CPUs."""
    if clean_probs is None:
        clean_probs = predict_perturbed(predict, images, PERTURBATIONS[0].name, 0, seed, chunk)
    clean = _aurocs(labels, clean_probs, findings)
    defined = [k for k, v in clean.items() if not np.isnan(v)]
    rows = []
    total, done = sum(len(spec.strengths) for spec in PERTURBATIONS), 0
    for spec in PERTURBATIONS:
        for level in range(len(spec.strengths) + 1):
            started = time.perf_counter()
            scores = clean if level == 0 else _aurocs(labels, predict_perturbed(predict, images, spec.name, level, seed, chunk), findings)
            strength = spec.clean if level == 0 else spec.strengths[level - 1]
            mean = float(np.mean([scores[k] for k in defined])) if defined else np.nan
            if level and progress:
                done += 1
                progress(f"robustness {done}/{total}: {spec.name} {strength} on {len(images):,} images, "
                         f"mean AUROC {mean:.3f} ({time.perf_counter() - started:.0f} s)")
            rows.append({"perturbation": spec.name, "label": spec.label, "level": level, "strength": strength,
                         "mean_auroc": mean, **scores})
    return pd.DataFrame(rows)
