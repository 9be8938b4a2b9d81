"""Out-of-distribution statistics of a checkpoint: what its training inputs looked like.

A model trained on one kind of image answers confidently on any other kind (a phantom-trained model
calls a real radiograph ``Cardiomegaly 1.000``). So that every scorer can say "this input is unlike
anything the model saw", a published checkpoint carries ``ood.npz`` beside ``model.pt``:

- **intensity**: per image, the pixel mean, standard deviation and 1/5/25/50/75/95/99th percentiles
  of the decoded ``uint8`` image (what preprocessing made, before standardisation);
- **features**: the penultimate layer (the input of the finding head, after global pooling).

Each is summarised on (a seeded sample of) the **training** images as a mean and a Ledoit-Wolf
shrunk covariance (``sklearn.covariance.LedoitWolf``; each dimension standardised first, so the
shrinkage pulls toward the correlation identity). An image's distance to a summary is its
Mahalanobis distance, read in units of the **validation** images' median distance (images the fit
never saw), and the image's combined distance is the larger of its two. The **threshold** is the
99th percentile (``QUANTILE``) of the validation images' combined distances, so about 1% of
in-distribution images exceed it; ``ood_score`` is the combined distance divided by the threshold,
and an image is flagged (``ood``) when ``ood_score > 1``. ``meta`` in the file states all of this.

The file is checked when read (``read_ood``): arrays of the shapes ``meta`` states, finite numbers,
and the SHA-256 of the ``model.pt`` it was computed for; a checkpoint without it (or with one made
for other weights) still scores, with null OOD fields and a note saying why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import CxrError
from pipelines.lineage import file_sha256
from pipelines.rundir import MODEL_FILE, OOD_FILE, RunDir

FORMAT = "cxr-ood/1"
QUANTILE = 0.99  # the validation percentile that sets the threshold
PERCENTILE = f"{QUANTILE * 100:g}th percentile"  # in words, for the file and the summaries
MAX_IMAGES = 512  # images per split the statistics are computed on (a seeded sample beyond that)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
INTENSITY_NAMES = ("mean", "std", *(f"p{p}" for p in PERCENTILES))
PARTS = ("intensity", "features")
RULE = (f"Mahalanobis distance (Ledoit-Wolf shrunk covariance of standardised dimensions, fit on training "
        f"images) of each image's pixel-intensity summary and of its penultimate-layer features, each divided "
        f"by its median over the validation images; the larger of the two, divided by its {PERCENTILE} "
        f"over the validation images, is ood_score; flagged when ood_score > 1")


class OodError(CxrError, ValueError):
    """An ``ood.npz`` that cannot be used; the message names the file and what is wrong."""


def intensity_summary(images: np.ndarray) -> np.ndarray:
    """``(n, 9)`` per-image pixel mean, std and percentiles of uint8 images ``(n, S, S)``."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    if not len(flat):
        return np.zeros((0, len(INTENSITY_NAMES)), np.float64)
    q = np.percentile(flat, PERCENTILES, axis=1).T
    return np.column_stack([flat.mean(1), flat.std(1), q]).astype(np.float64)


@dataclass(frozen=True)
class Gaussian:
    """A mean and shrunk precision in standardised coordinates: ``distance(x)`` is Mahalanobis."""

    center: np.ndarray  # (d,) per-dimension mean of the fit set
    scale: np.ndarray  # (d,) per-dimension std of the fit set (1 where it is 0)
    location: np.ndarray  # (d,) Ledoit-Wolf location of the standardised fit set
    precision: np.ndarray  # (d, d)
    typical: float  # the median distance of the validation images: distances are read in its units

    @classmethod
    def fit(cls, fit_set: np.ndarray, val_set: np.ndarray) -> "Gaussian":
        from sklearn.covariance import LedoitWolf

        center = fit_set.mean(0)
        scale = fit_set.std(0)
        scale = np.where(scale > 0, scale, 1.0)
        lw = LedoitWolf().fit((fit_set - center) / scale)
        g = cls(center, scale, lw.location_, lw.precision_, 1.0)
        return cls(center, scale, lw.location_, lw.precision_, max(float(np.median(g.distance(val_set))), 1e-12))

    def distance(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.center) / self.scale - self.location
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))


def _combined(parts: dict[str, Gaussian], intensity: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
    """Each part's distance in units of its validation median, and their maximum."""
    ratios = {name: parts[name].distance(x) / parts[name].typical for name, x in (("intensity", intensity), ("features", features))}
    return {**ratios, "max": np.maximum(ratios["intensity"], ratios["features"])}


@dataclass(frozen=True)
class OodStats:
    """The contents of ``ood.npz``: one ``Gaussian`` per part, the threshold, and the ``meta``
    stated in the file."""

    parts: dict[str, Gaussian]
    threshold: float  # the QUANTILE of the validation images' combined distances
    meta: dict[str, Any]

    def score(self, intensity: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """``ood_score`` (the combined distance over the threshold), ``ood`` (score > 1), and each
        part's distance in units of its validation median (``ood_intensity``, ``ood_features``)."""
        d = _combined(self.parts, intensity, features)
        score = d["max"] / self.threshold
        return {"ood_score": score.astype(np.float32), "ood": score > 1.0,
                "ood_intensity": d["intensity"].astype(np.float32), "ood_features": d["features"].astype(np.float32)}


def fit_ood(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], model_sha256: str,
            feature_layer: str) -> OodStats:
    """Fit both parts on ``train``, their units and the threshold on ``val``; each is (intensity, features)."""
    if len(train[0]) < 2 or len(val[0]) < 1:
        raise OodError(f"OOD statistics need at least 2 training and 1 validation image, got {len(train[0])} and {len(val[0])}")
    parts = {name: Gaussian.fit(train[k], val[k]) for k, name in enumerate(PARTS)}
    threshold = float(np.quantile(_combined(parts, *val)["max"], QUANTILE))
    meta = {
        "format": FORMAT,
        "rule": RULE,
        "quantile": QUANTILE,
        "fit_on": "train", "threshold_on": "val",
        "train_images": int(len(train[0])), "val_images": int(len(val[0])),
        "threshold": threshold,
        "intensity": {"dims": list(INTENSITY_NAMES), "val_median_distance": parts["intensity"].typical,
                      "train_mean": dict(zip(INTENSITY_NAMES, map(float, parts["intensity"].center)))},
        "features": {"layer": feature_layer, "dims": int(train[1].shape[1]), "val_median_distance": parts["features"].typical},
        "model_sha256": model_sha256,
    }
    return OodStats(parts, threshold, meta)


def write_ood(path: Path, stats: OodStats) -> None:
    """``ood.npz`` (compressed float32 arrays, ``meta`` as JSON text): written into a checkpoint
    folder that is being staged (trainers/publish.py), so it appears with the weights or not at all."""
    arrays = {f"{name}_{field}": getattr(g, field).astype(np.float32)
              for name, g in stats.parts.items() for field in ("center", "scale", "location", "precision")}
    np.savez_compressed(path, meta=np.array(json.dumps(stats.meta)), **arrays)


def read_ood(checkpoint: Path) -> tuple[OodStats | None, str]:
    """The checkpoint's OOD statistics and a one-line note; ``(None, why)`` when it has none or they
    were made for other weights (scoring goes on, OOD fields null). A damaged file is an OodError."""
    path = Path(checkpoint) / OOD_FILE
    if not path.is_file():
        return None, f"no {OOD_FILE} in {checkpoint} (trained before OOD statistics were recorded): ood fields are null"
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: np.asarray(data[k], np.float64) for k in data.files if k != "meta"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise OodError(f"{path}: not a readable OOD statistics file ({type(err).__name__}: {str(err)[:200]})") from None
    if meta.get("format") != FORMAT:
        raise OodError(f"{path}: format {meta.get('format')!r}, this build reads {FORMAT!r}")
    parts = {}
    for name in PARTS:
        try:
            center, scale, location, precision = (arrays[f"{name}_{f}"] for f in ("center", "scale", "location", "precision"))
            typical = float(meta[name]["val_median_distance"])
        except KeyError as err:
            raise OodError(f"{path}: missing {err.args[0]!r}") from None
        d = len(center)
        if scale.shape != (d,) or location.shape != (d,) or precision.shape != (d, d):
            raise OodError(f"{path}: the {name} arrays disagree in shape ({d} dims, precision {precision.shape})")
        if not all(np.isfinite(a).all() for a in (center, scale, location, precision)) or not (np.isfinite(typical) and typical > 0):
            raise OodError(f"{path}: the {name} statistics hold a non-finite number or a median distance <= 0")
        parts[name] = Gaussian(center, scale, location, precision, typical)
    threshold = meta.get("threshold")
    if not isinstance(threshold, (int, float)) or not np.isfinite(threshold) or threshold <= 0:
        raise OodError(f"{path}: 'threshold' must be a finite number > 0, got {threshold!r}")
    weights = Path(checkpoint) / MODEL_FILE
    if weights.is_file() and meta.get("model_sha256") != file_sha256(weights):
        return None, f"{path} was computed for other weights than {weights} (SHA-256 differs): ood fields are null"
    return OodStats(parts, float(threshold), meta), describe(meta)


def describe(meta: dict) -> str:
    """One line for summaries: what the threshold is and where it was set."""
    return (f"OOD threshold: the {PERCENTILE} of {meta['val_images']} validation images' Mahalanobis distances "
            f"(pixel intensities and {meta['features']['dims']}-d penultimate features, fit on {meta['train_images']} "
            f"training images); flagged when ood_score > 1")


def _sample(images: np.ndarray, seed: int) -> np.ndarray:
    if len(images) <= MAX_IMAGES:
        return images
    return images[np.sort(np.random.default_rng(seed).choice(len(images), MAX_IMAGES, replace=False))]


def split_images(run: RunDir, split: str, image_size: int) -> np.ndarray:
    """A split's preprocessed pixels ``(n, S, S)`` uint8 from the shards (what the model trained on)."""
    from pipelines.shards import IMAGE_COLUMN, images_from_column, scan_rows

    column = scan_rows(run.shards, split, [IMAGE_COLUMN]).to_table().column(IMAGE_COLUMN).to_pylist()
    return images_from_column(column, image_size) if column else np.zeros((0, image_size, image_size), np.uint8)


def record_ood(checkpoint: Path, run: RunDir, seed: int = 0) -> OodStats:
    """Compute the OOD statistics of the checkpoint folder ``checkpoint`` (model.pt + model.json)
    on ``run``'s train and val shards and write ``ood.npz`` into it."""
    from trainers.checkpoint import load_checkpoint
    from trainers.features import penultimate

    model, info = load_checkpoint(checkpoint)
    size = int(info["image_size"])
    sets = []
    for k, split in enumerate(("train", "val")):
        images = _sample(split_images(run, split, size), seed + k)
        sets.append((intensity_summary(images), penultimate(model, info, images)[1]))
    layer = f"input of {info['backbone']}'s finding head"
    stats = fit_ood(sets[0], sets[1], file_sha256(Path(checkpoint) / MODEL_FILE), layer)
    write_ood(Path(checkpoint) / OOD_FILE, stats)
    return stats
