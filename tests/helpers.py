"""Small data the tests make themselves: NIH-style label files and image files, good and bad."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"


def nih_row(image_id: str, labels: str = "No Finding", age: int | str = 50, sex: str = "M", view: str = "PA") -> str:
    patient, follow = image_id.split("_")
    return f"{image_id},{labels},{int(follow[:3])},{int(patient)},{age},{sex},{view},1024,1024,0.143,0.143"


def write_nih_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([NIH_HEADER, *rows]) + "\n")
    return path


def chest_like(size: int = 64, seed: int = 0) -> np.ndarray:
    """A plausible 8-bit image: a gradient with noise, neither blank nor constant nor saturated."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 60 + 100 * np.exp(-(((x - size / 2) / (size / 3)) ** 2 + ((y - size / 2) / (size / 2.5)) ** 2))
    return np.clip(base + rng.normal(0, 8, (size, size)), 1, 254).astype(np.uint8)


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def write_bad_files(folder: Path) -> dict[str, str]:
    """The bad inputs the issue names, keyed by file name, with the reason each must produce."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(chest_like(64)).save(good, format="PNG")
    (folder / "00000900_000.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated
    (folder / "00000901_000.png").write_bytes(b"")  # zero bytes
    (folder / "00000902_000.png").write_text("this is not an image\n")  # text named .png
    return {"00000900_000.png": "corrupt image data", "00000901_000.png": "empty file", "00000902_000.png": "not a recognized image format"}


def dicom_bytes(rows: int, columns: int, pixel_bytes: bytes | None, frames: int | None = None, rle: bool = False,
                bits: tuple[int, int] = (16, 12)) -> bytes:
    """A DICOM file as pydicom writes it (with the 128-byte preamble and ``DICM``): a real header
    declaring ``rows`` x ``columns`` (x frames) pixels of ``bits`` (allocated, stored), with whatever
    pixel data is given (a bomb declares far more than it holds; None: no pixel data at all).
    ``rle``: the pixel data is one RLE Lossless frame (encapsulated), as scanners compress."""
    import pydicom  # the tests that use it need pydicom, as DICOM collections do
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = RLELossless if rle else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = rows, columns
    if frames is not None:
        ds.NumberOfFrames = frames
    allocated, stored = bits
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, allocated, stored, stored - 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if pixel_bytes is not None and rle:
        ds.PixelData = encapsulate([pixel_bytes])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
