"""Synthetic chest X-rays ("phantoms") listed exactly like NIH ChestX-ray14.

The demo and the tests need a collection that goes through the same code as the real one (NIH's
``Data_Entry_2017.csv`` + PNGs + ``BBox_List_2017.csv``), is small and deterministic, has
patient-correlated labels (so patient leakage matters), and knows where each finding is (so the
Grad-CAM pointing game has ground truth). Anatomy and findings are described in millimetres and
rendered with vectorised numpy at any image size; the pixel spacing written to the CSV is the
one used to draw, so box sizes convert back to millimetres.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS, POSITIVE, format_nih_labels
from pipelines.sources.nih import BOX_HEADER

# The findings a phantom can carry, in FINDINGS order.
PLANTED: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")
MIN_POSITIVES = 3  # every planted finding gets at least this many positive images (if there are as many images)
# Where the labels come from and how far to trust them (the model card's "training data").
LABEL_NOTE = ("synthetic: each label says exactly which finding was drawn into the phantom, so the labels have no noise, "
              "and the images are not radiographs: figures on them say nothing about real patients")

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)

_FOLLOW_UP_COUNTS = np.arange(1, 7)
_FOLLOW_UP_P = np.array([0.45, 0.2, 0.12, 0.1, 0.07, 0.06])


@dataclass(frozen=True)
class Anatomy:
    """One chest in millimetres (x to the image's right, y down, origin at the image centre).

    The lung centred at ``-lung_cx`` is on the image's left (the patient's right in a PA view).
    """

    field_mm: float  # the side of the square image; pixel spacing = field_mm / image_size
    shift: tuple[float, float]  # patient positioning
    lung_cx: float  # distance of each lung's centre from the midline
    lung_cy: float
    lung_a: float  # lung half-width
    lung_b: float  # lung half-height
    heart_ctr: float  # cardiothoracic ratio (heart width / widest inner thorax)
    magnification: float  # AP views project the heart larger
    rib_pitch: float
    rib_phase: float
    exposure: float  # overall brightness gain
    texture_seed: int  # lung markings: one per patient, so follow-ups look alike
    noise_seed: int  # quantum noise: one per image

    @property
    def thorax_width(self) -> float:
        return 2.0 * (self.lung_cx + self.lung_a)

    def dome_peak(self, side: int) -> float:
        """The diaphragm's highest point below a lung; the right hemidiaphragm (image left) sits higher."""
        return self.lung_cy + 0.5 * self.lung_b + (8.0 if side > 0 else -4.0)


@dataclass(frozen=True)
class Finding:
    """A planted abnormality, in units that survive rendering at any size.

    ``size``: Mass/Nodule diameter (mm); Effusion fluid height above the costophrenic angle (mm);
    Cardiomegaly the cardiothoracic ratio; Pneumothorax the depth of the air rim as a fraction of
    the lung's radius. ``at``: Mass/Nodule centre (lateral, vertical) in lung half-axes; for a
    Pneumothorax the centre angle (degrees, 0 lateral, 90 apex) and half-width of its sector.
    """

    kind: str
    side: int = 1  # -1: image-left lung, +1: image-right lung
    size: float = 0.0
    contrast: float = 0.3
    at: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Box:
    """Where a finding is, in pixels of the rendered image (NIH's ``Bbox [x,y,w,h]``)."""

    finding: str
    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class PhantomCollection:
    """What make_collection wrote: ``ingest("nih", labels_csv, images)`` reads it like NIH's own."""

    root: Path
    images: Path
    labels_csv: Path
    boxes_csv: Path
    n_images: int
    n_patients: int
    cohorts_csv: Path  # Image Index, cohort: the clinic, and the ward (patients with heart failure)


# --------------------------------------------------------------------------- drawing helpers


def _soft(signed_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """0 -> 1 ramp across a boundary: ``signed_mm`` is positive inside, blur width ``edge_mm``."""
    ramp = signed_mm * (1.0 / edge_mm)
    ramp += 0.5
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def _superellipse_r(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, p: float) -> np.ndarray:
    return (np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p) ** (1.0 / p)


def _heart(an: Anatomy, ctr: float) -> tuple[float, float, float, float, float]:
    """Heart ellipse (cx, cy, semi-axis A, semi-axis B, tilt) whose horizontal extent is ctr x thorax.

    Python floats throughout: a numpy scalar here would silently turn the float32 image math float64.
    """
    half_w = 0.5 * ctr * an.thorax_width * an.magnification
    tilt = math.radians(20.0)
    k = 0.78  # B / A
    a = half_w / math.hypot(math.cos(tilt), k * math.sin(tilt))
    b = k * a
    cx = 0.2 * half_w  # the heart lies mostly on the patient's left (image right)
    cy = an.dome_peak(1) - 0.3 * _half_height((0.0, 0.0, a, b, tilt))  # its lower part hides in the diaphragm
    return cx, cy, a, b, tilt


def _half_height(heart: tuple[float, float, float, float, float]) -> float:
    _, _, a, b, tilt = heart
    return math.hypot(a * math.sin(tilt), b * math.cos(tilt))


def _heart_uv(x: np.ndarray, y: np.ndarray, heart: tuple[float, float, float, float, float]) -> np.ndarray:
    """Squared elliptic radius of (x, y) in the heart's ellipse (< 1 inside)."""
    cx, cy, a, b, tilt = heart
    c, s = math.cos(tilt), math.sin(tilt)
    u = (x - cx) * c + (y - cy) * s
    v = (y - cy) * c - (x - cx) * s
    return (u / a) ** 2 + (v / b) ** 2


def _heart_mask(x: np.ndarray, y: np.ndarray, heart: tuple[float, float, float, float, float]) -> np.ndarray:
    return _soft((1.0 - np.sqrt(_heart_uv(x, y, heart))) * heart[3], 4.0)


def _inside_heart(an: Anatomy, x: float, y: float, margin: float, ctr: float) -> bool:
    cx, cy, a, b, tilt = _heart(an, ctr)
    return bool(_heart_uv(np.float32(x), np.float32(y), (cx, cy, a + margin, b + margin, tilt)) < 1.0)


def _lung_markings(x: np.ndarray, y: np.ndarray, an: Anatomy, side: int) -> np.ndarray:
    """Vessel-like streaks branching out from the hilum and fading towards the periphery (0..1).

    Random profiles over angle and radius are tabulated finely and looked up by index, which is
    several times faster than np.interp over every pixel.
    """
    rng = np.random.default_rng([an.texture_seed, side + 1])
    hx, hy = side * (an.lung_cx - 0.7 * an.lung_a), an.lung_cy + 0.1 * an.lung_b
    dx, dy = x - np.float32(hx), y - np.float32(hy)
    rho = _dist(dx, dy)
    fine = 2048
    profile = rng.random(90) ** 3
    fan = np.interp(np.arange(fine), np.linspace(0, fine, 91), np.append(profile, profile[0]))  # periodic
    radial = np.linspace(0, fine, 40)
    twist = np.interp(np.arange(fine), radial, rng.normal(0.0, 0.04 * fine / (2 * np.pi), 40))  # vessels bend
    beads = np.interp(np.arange(fine), np.linspace(0, fine, 120), rng.random(120))  # and branch: they come and go
    r_index = np.minimum(rho * np.float32(fine / 300.0), fine - 1).astype(np.intp)
    angle = np.arctan2(dy, dx) * np.float32(fine / (2 * np.pi)) + twist.astype(np.float32)[r_index]
    streaks = fan.astype(np.float32)[angle.astype(np.intp) % fine] * (0.4 + 0.6 * beads.astype(np.float32)[r_index])
    hilum = np.exp(-((rho / 28.0) ** 2))
    return np.clip(streaks * np.exp(-rho / 85.0) + 0.8 * hilum, 0.0, 1.0)


def _dist(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Euclidean distance; with dx a row and dy a column the squares stay 1-D (np.hypot is slower)."""
    return np.sqrt(dx * dx + dy * dy)


def _box_from_mask(kind: str, mask: np.ndarray) -> Box:
    rows = np.flatnonzero(mask.max(axis=1) >= 0.5)
    cols = np.flatnonzero(mask.max(axis=0) >= 0.5)
    if rows.size == 0:
        raise ValueError(f"{kind} fell outside the image: its parameters do not fit this anatomy")
    return Box(kind, float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


# --------------------------------------------------------------------------- rendering


def render_phantom(
    anatomy: Anatomy, findings: Sequence[Finding] = (), image_size: int = 256
) -> tuple[np.ndarray, list[Box]]:
    """Draw one chest (uint8, image_size x image_size) with ``findings`` planted; returns the image
    and one box per finding in pixels.

    Pure: the same anatomy and findings give the same pixels, so rendering with and without a
    finding isolates exactly what the finding changed.
    """
    an = anatomy
    by_kind = {f.kind: f for f in findings}
    unknown = set(by_kind) - set(PLANTED)
    if unknown:
        raise ValueError(f"cannot plant {sorted(unknown)}: choose from {PLANTED}")
    spacing = an.field_mm / image_size
    coords = ((np.arange(image_size) + 0.5 - image_size / 2) * spacing).astype(np.float32)
    x = coords[None, :] - np.float32(an.shift[0])  # a row: broadcasting keeps 1-D work 1-D
    y = coords[:, None] - np.float32(an.shift[1])
    edge = max(3.0, spacing)  # boundaries no sharper than a pixel
    apex = an.lung_cy - an.lung_b

    # body: the X-ray path is longest at the midline, so the flanks are darker than the centre
    half = an.thorax_width / 2 + 25.0
    trunk = _soft((1.0 - _superellipse_r(x, y, 0.0, an.lung_cy + 60.0, half, an.lung_b + 110.0, 3.5)) * half, 8.0)
    neck = _soft(50.0 - np.abs(x), 8.0) * _soft(apex + 20.0 - y, 10.0)
    body = np.maximum(trunk, neck)
    density = body * (0.38 + 0.27 * np.sqrt(np.clip(1.0 - (x / half) ** 2, 0.0, 1.0)))

    # lungs, cut below by the diaphragm domes; darkest where they are thickest
    air = np.zeros_like(density)
    lung_r: dict[int, np.ndarray] = {}
    lung_shape: dict[int, np.ndarray] = {}
    for side in (-1, 1):
        cx = side * an.lung_cx
        r = _superellipse_r(x, y, cx, an.lung_cy, an.lung_a, an.lung_b, 2.3)
        dome = an.dome_peak(side) + 42.0 * ((x - cx - side * 0.1 * an.lung_a) / an.lung_a) ** 2
        lung_r[side] = r
        lung_shape[side] = _soft((1.0 - r) * an.lung_b, edge) * _soft(dome - y, edge)
        air += lung_shape[side] * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0)))

    ctr = by_kind["Cardiomegaly"].size if "Cardiomegaly" in by_kind else an.heart_ctr
    heart_geometry = _heart(an, ctr)
    heart = _heart_mask(x, y, heart_geometry)
    heart_top = heart_geometry[1] - _half_height(heart_geometry)
    widening = np.clip((y - apex) / max(heart_top - apex, 1.0), 0.0, 1.0)
    mediastinum = _soft(19.0 + 12.0 * widening - np.abs(x - 3.0), 6.0)
    aortic_knob = _soft(15.0 - _dist(x - 24.0, y - (apex + 0.32 * an.lung_b)), 4.0)
    visible = air * (1 - heart) * (1 - mediastinum) * (1 - aortic_knob)

    texture = _lung_markings(x, y, an, -1) * lung_shape[-1] + _lung_markings(x, y, an, 1) * lung_shape[1]
    aeration = np.ones_like(density)  # 1 where the lung holds its normal air; findings change it
    boxes: list[Box] = []

    if "Effusion" in by_kind:
        f = by_kind["Effusion"]
        cx = f.side * an.lung_cx
        lateral = np.clip((f.side * (x - cx) / an.lung_a + 1.0) / 2.0, 0.0, 1.0)  # 0 medial, 1 lateral
        angle_y = an.dome_peak(f.side) + 42.0 * 0.9**2  # the costophrenic angle: the dome at the lung's lateral edge
        top = angle_y - f.size * (0.5 + 0.8 * lateral**2)  # meniscus: the fluid climbs the chest wall
        fluid = _soft(y - top, 8.0) * lung_shape[f.side]
        aeration -= f.contrast * fluid
        texture *= 1 - fluid
        boxes.append(_box_from_mask("Effusion", fluid))

    if "Pneumothorax" in by_kind:
        f = by_kind["Pneumothorax"]
        cx = f.side * an.lung_cx
        psi = np.degrees(np.arctan2(-(y - an.lung_cy) / an.lung_b, f.side * (x - cx) / an.lung_a))
        centre, spread = f.at
        window = np.cos(0.5 * np.pi * np.clip((psi - centre) / spread, -1.0, 1.0)) ** 2
        rim_mm = (lung_r[f.side] - (1.0 - f.size * window)) * an.lung_a  # outside the collapsed lung's edge
        space = _soft(rim_mm, max(2.0, spacing)) * lung_shape[f.side] * (window > 0.05)
        pleura = np.exp(-((rim_mm / max(1.2, 0.6 * spacing)) ** 2)) * lung_shape[f.side] * (window > 0.15)
        texture *= 1 - space
        aeration += f.contrast * space  # air with no lung in it: darker than lung
        density += 0.12 * pleura
        boxes.append(_box_from_mask("Pneumothorax", space))

    for kind in ("Mass", "Nodule"):
        if kind in by_kind:
            f = by_kind[kind]
            radius = f.size / 2
            cx = f.side * (an.lung_cx + f.at[0] * an.lung_a)
            cy = an.lung_cy + f.at[1] * an.lung_b
            d = _dist(x - cx, y - cy)
            outline = radius
            if kind == "Mass":  # lobulated, inside its circumscribing circle
                outline = radius * (0.92 + 0.08 * np.cos(3 * np.arctan2(y - cy, x - cx) + 7.0 * f.at[0]))
            blob = np.sqrt(np.sqrt(np.clip(1.0 - (d / outline) ** 2, 0.0, 1.0)))  # a sphere's thickness, flattened
            density += f.contrast * blob * body
            texture *= 1 - 0.7 * blob
            boxes.append(Box(kind, *_mm_box_to_px(cx - radius, cy - radius, 2 * radius, 2 * radius, an, image_size)))

    if "Cardiomegaly" in by_kind:  # the heart as seen: above the diaphragm
        boxes.append(_box_from_mask("Cardiomegaly", heart * _soft(an.dome_peak(1) + 10.0 - y, 4.0)))

    density -= 0.42 * visible * aeration
    density += 0.3 * texture * visible * np.clip(aeration, 0.0, 1.0)

    # bones: posterior ribs (arching down laterally), fainter anterior ribs, clavicles, spine
    lateral = np.abs(x) / (an.thorax_width / 2)
    cage_r = _superellipse_r(x, y, 0.0, an.lung_cy, an.thorax_width / 2 + 12.0, an.lung_b + 12.0, 2.3)
    cage = _soft((1.0 - cage_r) * an.lung_b, 6.0) * _soft(an.dome_peak(-1) + 20.0 - y, 20.0) * _soft(np.abs(x) - 14.0, 6.0)
    for curve, weight in ((60.0 * lateral**2 - 15.0 * lateral, 0.075), (-40.0 * lateral, 0.03)):
        phase = (y - curve - an.rib_phase) / an.rib_pitch
        band = np.clip(1.0 - np.abs(phase - np.floor(phase) - 0.5) / 0.22, 0.0, 1.0)
        density += weight * np.sqrt(band) * cage
    for side in (-1, 1):
        x0, y0 = side * 18.0, apex + 18.0
        x1, y1 = side * (an.thorax_width / 2 + 30.0), apex - 15.0
        t = np.clip(((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0.0, 1.0)
        density += 0.12 * _soft(6.0 - _dist(x - (x0 + t * (x1 - x0)), y - (y0 + t * (y1 - y0))), 3.0) * body
    vertebrae = 0.7 + 0.3 * np.cos(np.pi * (y - an.rib_phase) / 26.0) ** 2
    density += 0.06 * _soft(16.0 - np.abs(x), 5.0) * vertebrae * body
    trachea = _soft(8.0 - np.abs(x - 2.0), 4.0) * _soft(an.lung_cy - 0.4 * an.lung_b - y, 6.0)
    density -= 0.1 * trachea * body
    density += 0.06 * _soft(y - an.dome_peak(-1) - 15.0, 40.0) * body  # liver and abdomen

    noise = np.random.default_rng(an.noise_seed).standard_normal(density.shape, dtype=np.float32) * 0.018
    image = np.clip(an.exposure * density + 0.03, 0.0, 1.0) ** 0.9 + noise
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), boxes


def _mm_box_to_px(
    x_mm: float, y_mm: float, w_mm: float, h_mm: float, an: Anatomy, image_size: int
) -> tuple[float, float, float, float]:
    spacing = an.field_mm / image_size
    return (
        (x_mm + an.shift[0]) / spacing + image_size / 2,
        (y_mm + an.shift[1]) / spacing + image_size / 2,
        w_mm / spacing,
        h_mm / spacing,
    )


# --------------------------------------------------------------------------- sampling


def sample_anatomy(rng: np.random.Generator, sex: str = "M", view: str = "PA") -> Anatomy:
    """A plausible adult chest; women's are drawn a little smaller, AP views magnify the heart."""
    scale = rng.normal(1.0 if sex == "M" else 0.93, 0.04)
    return Anatomy(
        field_mm=float(rng.integers(350, 431)),
        shift=(float(rng.normal(0.0, 6.0)), float(rng.normal(0.0, 8.0))),
        lung_cx=78.0 * scale,
        lung_cy=5.0 + float(rng.normal(0.0, 5.0)),
        lung_a=62.0 * scale * float(rng.uniform(0.95, 1.05)),
        lung_b=125.0 * scale * float(rng.uniform(0.92, 1.06)),
        heart_ctr=float(rng.uniform(0.38, 0.46)),
        magnification=_magnification(view),
        rib_pitch=float(rng.uniform(21.0, 26.0)),
        rib_phase=float(rng.uniform(0.0, 25.0)),
        exposure=float(rng.uniform(0.95, 1.1)),
        texture_seed=int(rng.integers(2**31)),
        noise_seed=int(rng.integers(2**31)),
    )


def _magnification(view: str) -> float:
    return 1.12 if view == "AP" else 1.0


def _follow_up(rng: np.random.Generator, base: Anatomy, view: str) -> Anatomy:
    """The same chest on another day: other detector field, positioning, inspiration, exposure, noise."""
    return replace(
        base,
        field_mm=float(rng.integers(350, 431)),
        shift=(float(rng.normal(0.0, 6.0)), float(rng.normal(0.0, 8.0))),
        lung_b=base.lung_b * float(rng.uniform(0.96, 1.04)),
        magnification=_magnification(view),
        exposure=float(rng.uniform(0.95, 1.1)),
        noise_seed=int(rng.integers(2**31)),
    )


def sample_finding(rng: np.random.Generator, kind: str, anatomy: Anatomy) -> Finding:
    """Random size, side, contrast and place for one finding that fits ``anatomy``."""
    side = int(rng.choice((-1, 1)))
    if kind == "Cardiomegaly":
        return Finding(kind, size=float(rng.uniform(0.55, 0.66)))
    if kind == "Effusion":
        return Finding(kind, side, size=float(rng.uniform(35.0, 80.0)), contrast=float(rng.uniform(0.85, 1.0)))
    if kind == "Pneumothorax":
        sector = (float(rng.uniform(55.0, 90.0)), float(rng.uniform(55.0, 80.0)))
        return Finding(kind, side, size=float(rng.uniform(0.25, 0.45)), contrast=float(rng.uniform(0.35, 0.5)), at=sector)
    if kind in ("Mass", "Nodule"):
        diameter = float(rng.uniform(36.0, 65.0) if kind == "Mass" else rng.uniform(10.0, 25.0))
        contrast = float(rng.uniform(0.2, 0.32) if kind == "Mass" else rng.uniform(0.2, 0.3))
        return Finding(kind, side, size=diameter, contrast=contrast, at=_place_in_lung(rng, anatomy, side, diameter / 2))
    raise ValueError(f"cannot plant {kind!r}: choose from {PLANTED}")


def _place_in_lung(rng: np.random.Generator, an: Anatomy, side: int, radius: float) -> tuple[float, float]:
    """A centre (lung half-axes) for a round opacity that stays in the lung, above the diaphragm and
    clear of even an enlarged heart."""
    for _ in range(200):
        lx, ly = float(rng.uniform(-0.1, 0.5)), float(rng.uniform(-0.55, 0.2))
        x, y = side * (an.lung_cx + lx * an.lung_a), an.lung_cy + ly * an.lung_b
        r = (abs(lx) ** 2.3 + abs(ly) ** 2.3) ** (1 / 2.3)  # the lung's own superellipse radius
        fits_lung = r + radius / an.lung_a < 0.95 and y + radius < an.dome_peak(side)
        if fits_lung and not _inside_heart(an, x, y, radius + 5.0, 0.66):
            return lx, ly
    return 0.35, -0.3  # the upper outer lung, far from heart and diaphragm


# --------------------------------------------------------------------------- the collection


@dataclass
class _Planned:
    """One image of the collection before it is drawn."""

    patient: int
    follow_up: int
    age: int
    sex: str
    view: str
    anatomy: Anatomy
    candidates: dict[str, Finding]  # every finding this image would show if labelled with it
    labels: set[str] = field(default_factory=set)
    cohort: str = "clinic"

    @property
    def image_id(self) -> str:
        return f"{self.patient:08d}_{self.follow_up:03d}.png"


def _plan_patient(seed: int, patient: int) -> list[_Planned]:
    """All follow-ups of one patient. Chronic findings (Cardiomegaly, Mass, Nodule, a tendency to
    Effusion) belong to the patient and persist from their onset on; Pneumothorax is acute.

    Patients with heart failure (an enlarged heart or a tendency to effusions) are seen on the
    ``ward``, everyone else in the ``clinic``: two cohorts whose case mix differs the way real
    collections do, chosen after the draw so the images are those of a collection without cohorts."""
    rng = np.random.default_rng([seed, patient])
    n = int(rng.choice(_FOLLOW_UP_COUNTS, p=_FOLLOW_UP_P))
    sex = str(rng.choice(("M", "F")))
    age = int(rng.integers(18, 86))
    base = sample_anatomy(rng, sex)
    chronic = {k: sample_finding(rng, k, base) for k in ("Cardiomegaly", "Mass", "Nodule")}
    effusion_side = int(rng.choice((-1, 1)))
    has = {"Cardiomegaly": rng.random() < 0.3, "Mass": rng.random() < 0.07, "Nodule": rng.random() < 0.12}
    onset = {k: (0 if rng.random() < 0.6 else int(rng.integers(0, n))) for k in has}
    effusion_prone = rng.random() < 0.15 + 0.4 * has["Cardiomegaly"]  # heart failure
    images = []
    for k in range(n):
        age += int(rng.random() < 0.4)
        view = "AP" if rng.random() < 0.3 else "PA"
        anatomy = _follow_up(rng, base, view)
        candidates = {
            "Cardiomegaly": replace(chronic["Cardiomegaly"], size=chronic["Cardiomegaly"].size * rng.uniform(0.97, 1.03)),
            "Effusion": replace(sample_finding(rng, "Effusion", anatomy), side=effusion_side),
            "Mass": replace(chronic["Mass"], size=chronic["Mass"].size * (1.0 + 0.04 * k)),  # slowly growing
            "Nodule": chronic["Nodule"],
            "Pneumothorax": sample_finding(rng, "Pneumothorax", anatomy),
        }
        labels = {f for f in has if has[f] and k >= onset[f] and rng.random() < 0.92}
        if rng.random() < (0.65 if effusion_prone else 0.05):
            labels.add("Effusion")
        if rng.random() < 0.06:
            labels.add("Pneumothorax")
        cohort = "ward" if has["Cardiomegaly"] or effusion_prone else "clinic"
        images.append(_Planned(patient, k, min(age, 90), sex, view, anatomy, candidates, labels, cohort))
    return images


def _ensure_positives(images: list[_Planned], seed: int) -> None:
    """Give every planted finding at least MIN_POSITIVES positive images, so even a tiny collection
    can be trained and evaluated on each. Chronic findings are added from a follow-up onwards."""
    rng = np.random.default_rng([seed, 0])
    for kind in PLANTED:
        while sum(kind in im.labels for im in images) < min(MIN_POSITIVES, len(images)):
            lacking = [im for im in images if kind not in im.labels]
            pick = lacking[int(rng.integers(len(lacking)))]
            chronic = kind in ("Cardiomegaly", "Mass", "Nodule")
            for im in images:
                if im is pick or (chronic and im.patient == pick.patient and im.follow_up > pick.follow_up):
                    im.labels.add(kind)


def _number(value: float) -> str:
    return repr(round(float(value), 4))


def make_collection(out_dir: Path, n_patients: int = 60, image_size: int = 256, seed: int = 0) -> PhantomCollection:
    """Write a phantom collection laid out like NIH ChestX-ray14 under ``out_dir``: ``images/``,
    ``Data_Entry_2017.csv`` and ``BBox_List_2017.csv`` (one box per planted finding).

    Deterministic: the same arguments write the same bytes. Files of the same name are overwritten;
    other files in ``images/`` are left alone (unlisted, so ingest never reads them).
    """
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise UserInputError(f"n_patients must be a positive integer, got {n_patients!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise UserInputError(f"image_size must be an integer >= 32 (findings vanish below that), got {image_size!r}")
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    planned = [im for p in range(1, n_patients + 1) for im in _plan_patient(seed, p)]
    _ensure_positives(planned, seed)

    entries = io.StringIO()
    boxes_out = io.StringIO()
    entry_writer = csv.writer(entries, lineterminator="\n")
    box_writer = csv.writer(boxes_out, lineterminator="\n")
    for im in planned:
        findings = [im.candidates[k] for k in PLANTED if k in im.labels]
        pixels, boxes = render_phantom(im.anatomy, findings, image_size)
        Image.fromarray(pixels).save(images_dir / im.image_id, format="PNG")
        spacing = repr(im.anatomy.field_mm / image_size)
        labels = format_nih_labels({k: POSITIVE for k in im.labels})
        entry_writer.writerow(
            [im.image_id, labels, im.follow_up, im.patient, im.age, im.sex, im.view]
            + [image_size, image_size, spacing, spacing]
        )
        for b in boxes:
            box_writer.writerow([im.image_id, b.finding, _number(b.x), _number(b.y), _number(b.w), _number(b.h)])
    labels_csv = root / "Data_Entry_2017.csv"
    boxes_csv = root / "BBox_List_2017.csv"
    cohorts_csv = root / "cohorts.csv"
    labels_csv.write_text(NIH_HEADER + "\n" + entries.getvalue(), encoding="utf-8")
    boxes_csv.write_text(BOX_HEADER + "\n" + boxes_out.getvalue(), encoding="utf-8")
    cohorts_csv.write_text("Image Index,cohort\n" + "".join(f"{im.image_id},{im.cohort}\n" for im in planned), encoding="utf-8")
    return PhantomCollection(root, images_dir, labels_csv, boxes_csv, len(planned), n_patients, cohorts_csv)
