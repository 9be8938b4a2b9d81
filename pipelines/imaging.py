"""Decode one image file (PNG/JPEG/DICOM, any mode) to a fixed-size 8-bit grayscale array.

Shared by preprocessing, prediction and the benchmarks so that every path sees the same pixels.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.errors import CxrError, UserInputError

DICOM_SUFFIXES = (".dcm", ".dicom")
# The largest square side any stage resizes to (preprocess --image-size, a checkpoint's image_size):
# 4096x4096 uint8 is 16 MiB an image, already far beyond what a chest X-ray model is trained on.
MAX_IMAGE_SIZE = 4096


class DecodeError(CxrError, ValueError):
    """An image file that cannot be turned into pixels; the message says why, ``kind`` says which
    way it failed (one of ``DECODE_FAILURES``), for callers that answer each differently (a server's
    status codes)."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep the kind across processes (a Ray task's error)
        return type(self), (str(self), self.kind)


# How decoding can fail: DecodeError.kind.
DECODE_FAILURES = ("empty", "unrecognized", "truncated", "corrupt", "too_large", "no_pixels", "unreadable")
# Leading bytes of the formats every stage accepts by content, whatever the file is called.
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
DICOM_PREAMBLE, DICOM_MAGIC = 128, b"DICM"  # a DICOM Part 10 file: 128-byte preamble, then "DICM"


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"dicom"`` from a file's leading bytes, else None. DICOM is known by
    the ``DICM`` marker after the 128-byte preamble of a Part 10 file (a file without it, DICOM's old
    bare format, is read as DICOM only when its name ends in .dcm/.dicom)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[DICOM_PREAMBLE:DICOM_PREAMBLE + len(DICOM_MAGIC)] == DICOM_MAGIC:
        return "dicom"
    return None


def pixel_limit() -> int | None:
    """The most samples an image may declare before it is refused as a decompression bomb, or None
    for no limit. One setting for every format: PIL's ``Image.MAX_IMAGE_PIXELS`` (read at call time,
    so lowering or raising it governs PNG/JPEG and DICOM alike). PIL refuses an image above twice
    that number (``DecompressionBombError``; between one and two times it only warns); so does DICOM."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (size, size) uint8
    orig_width: int
    orig_height: int
    orig_mode: str


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a grayscale array of any depth to 0..255.

    Integer data deeper than 8 bits is scaled by its bit depth (the smallest power of two above its
    maximum, at least 8 bits), so a 12-bit image stored in 16 bits keeps its contrast and a dark
    image stays dark; float data is min-max scaled.
    """
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        low = int(array.min()) if array.size else 0
        if low < 0:
            array = array.astype(np.int64) - low
        top = int(array.max()) if array.size else 0
        bits = max(8, math.ceil(math.log2(top + 1))) if top > 0 else 8
        return np.round(array.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)
    array = array.astype(np.float64)
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.round((np.nan_to_num(array, nan=low) - low) * (255.0 / (high - low))).astype(np.uint8)


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit ``L``. RGBA is composited on black (X-ray background) before
    conversion, palette images are expanded, 16/32-bit and float go through ``to_uint8``."""
    mode = image.mode
    if mode == "L":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(to_uint8(np.asarray(image)))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image.convert("L")


def _check_dicom_size(ds) -> None:
    """Refuse a DICOM whose header declares more samples (Rows x Columns x frames x samples per pixel)
    than the pixel limit, before its pixel data is decoded: a few hundred KB declaring 60000x60000
    would otherwise make pydicom allocate gigabytes."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except AttributeError:
        raise DecodeError("DICOM header has no Rows/Columns: no image in the file", "no_pixels") from None
    except (TypeError, ValueError) as err:
        raise DecodeError(f"DICOM header has an unreadable image size: {err}") from None
    if min(rows, columns, frames, samples) < 1:
        raise DecodeError(f"DICOM header declares an empty image ({rows}x{columns}, {frames} frame(s), {samples} sample(s) per pixel)",
                          "no_pixels")
    total = rows * columns * frames * samples
    limit = pixel_limit()
    if limit is not None and total > limit:
        raise DecodeError(
            f"DICOM declares {rows}x{columns} pixels x {frames} frame(s) x {samples} sample(s) = {total} samples, over the "
            f"decompression-bomb limit of {limit} (twice PIL.Image.MAX_IMAGE_PIXELS): refused before decoding", "too_large"
        )


PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read_dicom(data: bytes) -> tuple[np.ndarray, str]:
    import pydicom  # only DICOM collections need it
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))  # reads the header and keeps the pixel bytes undecoded
    _check_dicom_size(ds)
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise DecodeError("DICOM has no pixel data (no PixelData element): a header-only object, e.g. a report or a "
                          "presentation state, not an image", "no_pixels")
    pixels = apply_voi_lut(ds.pixel_array, ds)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 stores bone dark: invert to the usual look
    return to_uint8(np.asarray(pixels)), f"DICOM {getattr(ds, 'PhotometricInterpretation', '')}".strip()


def decode_bytes(data: bytes, image_size: int, name: str = "") -> Decoded:
    """Decode ``data`` and resize to ``image_size`` square (bilinear, antialiased on downscale).

    Raises DecodeError with a reason for empty, truncated or non-image data, and for images larger
    than the pixel limit (``pixel_limit``: PIL's decompression-bomb setting, for DICOM too). DICOM is
    recognized by its name (.dcm, .dicom) or by its content (``sniff_format``); anything else goes
    to PIL, which recognizes formats by content.
    """
    if not isinstance(image_size, (int, np.integer)) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise UserInputError(f"image size must be an integer between 1 and {MAX_IMAGE_SIZE}, got {image_size!r}")
    if not data:
        raise DecodeError("empty file (0 bytes)", "empty")
    try:
        if name.lower().endswith(DICOM_SUFFIXES) or sniff_format(data) == "dicom":
            array, mode = _read_dicom(data)
            image = Image.fromarray(array)
        else:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                mode = opened.mode
                image = to_grayscale(opened)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not a recognized image format", "unrecognized") from None
    except Image.DecompressionBombError as err:
        raise DecodeError(f"image too large: {err}", "too_large") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports truncation and corrupt chunks this way
        raise DecodeError(f"corrupt image data: {err}", "truncated" if "truncated" in str(err).lower() else "corrupt") from None
    except Exception as err:  # pydicom raises its own types for broken files
        raise DecodeError(f"corrupt image data: {type(err).__name__}: {err}") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise DecodeError("image has zero width or height", "no_pixels")
    resized = image.resize((image_size, image_size), Image.BILINEAR, reducing_gap=3.0)
    return Decoded(np.asarray(resized, dtype=np.uint8), width, height, mode)


def decode_file(path: Path, image_size: int) -> Decoded:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DecodeError(f"cannot read file: {err.strerror or err}", "unreadable") from None
    return decode_bytes(data, image_size, path.name)
