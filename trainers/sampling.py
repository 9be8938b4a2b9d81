"""Resampling at the data level, redrawn every epoch, deterministic in (seed, epoch, image).

Multi-label aware: an image carries several findings, so it cannot be put in one class bucket.

- ``over``: an image is repeated according to its RAREST positive finding. Finding j gets the factor
  ``n_max / n_j`` (the positives of the most common finding over its own), capped at
  ``max_repeat``; an image's expected number of copies per epoch is the largest factor among its
  positive findings (1 if it has none). Fractional parts are drawn per epoch, so an expected 2.5
  gives 2 or 3 copies. Rare findings gain positives; the coupling of co-occurring findings (an image
  repeated for Hernia also repeats its Infiltration) is the known cost of multi-label oversampling.
- ``under``: every image with at least one positive is kept (dropping one would lose scarce
  positives); all-negative images are kept with probability ``under_ratio * n_any / n_none`` so
  they number about ``under_ratio`` times the images with a finding. A different subset each epoch,
  so over the run every negative is seen.

The random draw for an image is a hash of (seed, epoch, image key), so it does not depend on how Ray
Data cut the rows into blocks, and a run resumed at epoch k redraws exactly the sample of epoch k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingPlan:
    mode: str  # none | over | under
    seed: int
    repeat_by_finding: tuple[float, ...] = ()  # over: expected copies of an image, by its rarest finding
    keep_negative: float = 1.0  # under: probability an all-negative image is kept


def make_plan(labels: np.ndarray, mode: str, seed: int, max_repeat: float = 4.0, under_ratio: float = 1.0) -> SamplingPlan:
    """The plan from the TRAINING labels ``(n, findings)`` (1 positive; 0 or -1 not positive)."""
    labels = np.asarray(labels)
    if mode == "none":
        return SamplingPlan("none", seed)
    positives = (labels == 1).sum(axis=0)
    if mode == "over":
        n_max = positives.max() if len(positives) else 0
        factors = np.where(positives > 0, n_max / np.maximum(positives, 1), 1.0)
        return SamplingPlan("over", seed, tuple(float(f) for f in np.clip(factors, 1.0, max_repeat)))
    if mode == "under":
        any_pos = (labels == 1).any(axis=1)
        n_any, n_none = int(any_pos.sum()), int((~any_pos).sum())
        keep = 1.0 if n_none == 0 else min(1.0, under_ratio * n_any / n_none)
        return SamplingPlan("under", seed, keep_negative=float(keep))
    raise ValueError(f"unknown sampling {mode!r}: choose none, over or under")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(keys: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A uniform [0, 1) number per key, a pure function of (seed, epoch, key)."""
    with np.errstate(over="ignore"):
        x = np.asarray(keys).astype(np.uint64)
        x = _splitmix64(x ^ _splitmix64(np.full_like(x, seed)))
        x = _splitmix64(x ^ _splitmix64(np.full_like(x, epoch + 0x5EED)))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def copies(plan: SamplingPlan, labels: np.ndarray, keys: np.ndarray, epoch: int) -> np.ndarray:
    """How many times each row appears in epoch ``epoch`` (0, 1, 2, ...)."""
    n = len(keys)
    if plan.mode == "none":
        return np.ones(n, dtype=np.int64)
    positive = np.asarray(labels) == 1
    u = uniform(keys, plan.seed, epoch)
    if plan.mode == "over":
        factors = np.where(positive, np.asarray(plan.repeat_by_finding), 1.0).max(axis=1) if n else np.ones(0)
        whole = np.floor(factors)
        return (whole + (u < factors - whole)).astype(np.int64)
    keep = positive.any(axis=1) | (u < plan.keep_negative)
    return keep.astype(np.int64)


def resample_rows(batch: dict[str, np.ndarray], plan: SamplingPlan, epoch: int) -> dict[str, np.ndarray]:
    """Repeat or drop the rows of a tensor batch (``labels``, ``key``, ...) for epoch ``epoch``."""
    index = np.repeat(np.arange(len(batch["key"])), copies(plan, batch["labels"], batch["key"], epoch))
    return {name: column[index] for name, column in batch.items()}
