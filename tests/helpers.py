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
