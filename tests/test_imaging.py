"""Decoding any input to fixed-size 8-bit grayscale, and clear reasons for what cannot be decoded."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.imaging import DecodeError, decode_file, to_uint8
from tests.helpers import chest_like, write_bad_files, write_png


def test_8bit_grayscale_is_resized_to_the_target(tmp_path):
    d = decode_file(write_png(tmp_path / "a.png", chest_like(100)), 32)
    assert d.pixels.shape == (32, 32) and d.pixels.dtype == np.uint8
    assert (d.orig_width, d.orig_height, d.orig_mode) == (100, 100, "L")


def test_rgba_is_converted_to_grayscale(tmp_path):
    gray = chest_like(40)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    d = decode_file(write_png(tmp_path / "rgba.png", rgba, "RGBA"), 40)
    assert d.orig_mode == "RGBA"
    assert np.abs(d.pixels.astype(int) - gray.astype(int)).max() <= 1


def test_16bit_png_keeps_its_contrast(tmp_path):
    # a 12-bit image stored in 16 bits: scaled by its 12-bit depth, not by 65535 (which would be black)
    values = (chest_like(32).astype(np.uint16) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # uint16 -> mode I;16
    d = decode_file(path, 32)
    assert d.orig_mode.startswith("I")
    expected = np.round(values * 255.0 / 4095).astype(np.uint8)
    assert np.abs(d.pixels.astype(int) - expected.astype(int)).max() <= 1
    assert d.pixels.max() > 150  # scaled by 65535 it would be about 12


def test_to_uint8_float_is_min_max_scaled():
    out = to_uint8(np.array([[0.5, 1.5], [2.5, 2.5]]))
    assert out.tolist() == [[0, 128], [255, 255]]


@pytest.mark.parametrize("case", ["00000900_000.png", "00000901_000.png", "00000902_000.png"])
def test_bad_files_raise_a_decode_error_with_the_reason(tmp_path, case):
    expected = write_bad_files(tmp_path)[case]
    with pytest.raises(DecodeError, match=expected):
        decode_file(tmp_path / case, 32)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="cannot read file"):
        decode_file(tmp_path / "nope.png", 32)


def test_dicom_monochrome1_is_inverted(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = (chest_like(32).astype(np.uint16) * 4).astype(np.uint16)  # 10-bit data
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 10, 9, 0
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    d = decode_file(path, 32)
    assert "MONOCHROME1" in d.orig_mode
    # inverted: the brightest input pixel is the darkest output pixel
    assert d.pixels.flat[np.argmax(pixels)] == d.pixels.min()
