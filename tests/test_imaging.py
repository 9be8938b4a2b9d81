"""Decoding any input to fixed-size 8-bit grayscale, and clear reasons for what cannot be decoded."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.imaging import DecodeError, decode_bytes, decode_file, sniff_format, to_uint8
from tests.helpers import chest_like, dicom_bytes, write_bad_files, write_png


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


@pytest.mark.parametrize("case,kind", [("00000900_000.png", "truncated"), ("00000901_000.png", "empty"), ("00000902_000.png", "unrecognized")])
def test_a_decode_error_says_which_way_it_failed_and_keeps_it_across_processes(tmp_path, case, kind):
    import pickle

    write_bad_files(tmp_path)
    with pytest.raises(DecodeError) as caught:
        decode_file(tmp_path / case, 32)
    assert caught.value.kind == kind
    again = pickle.loads(pickle.dumps(caught.value))  # as a Ray task's error reaches the driver
    assert (again.kind, str(again)) == (kind, str(caught.value))


def test_formats_are_known_by_content_and_a_dicom_decodes_whatever_its_name(tmp_path):
    import io

    pixels = chest_like(48)
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    dicom = dicom_bytes(48, 48, pixels.tobytes(), bits=(8, 8))
    assert [sniff_format(b) for b in (png.getvalue(), jpeg.getvalue(), dicom, b"hello", b"", b"\x89PN")] == ["png", "jpeg", "dicom", None, None, None]
    for name in ("", "upload.png", "x.dcm"):  # by content: the name only adds .dcm/.dicom for DICOMs without the DICM marker
        assert np.array_equal(decode_bytes(dicom, 48, name).pixels, pixels)


def test_a_dicom_without_pixel_data_says_so():
    with pytest.raises(DecodeError, match="no pixel data") as caught:
        decode_bytes(dicom_bytes(64, 64, None), 32)
    assert caught.value.kind == "no_pixels"


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


# --------------------------------------------------------------------------- decompression bombs


def _rle_zeros_frame(n_bytes: int) -> bytes:
    """One RLE Lossless frame of two PackBits segments (high and low byte of 16-bit samples), each
    runs of 128 zero bytes: ``n_bytes`` of file that decode to 64 times as much."""
    import struct

    segment = b"\x81\x00" * ((n_bytes - 64) // 4)
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    return header + segment + segment


# Run in a child whose address space is capped a little above what it has mapped after its imports:
# if the header check were missing, pydicom's 6.7 GiB allocation would fail there (MemoryError,
# reported as "corrupt image data") instead of taking the machine's memory.
_BOMB_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, pydicom, pydicom.pixels  # everything the decode needs, loaded before the cap
from pipelines.imaging import DecodeError, decode_file
from pipelines.preprocess import _decode_batch
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + (512 << 20), resource.RLIM_INFINITY))
out = {}
try:
    decode_file(sys.argv[2], 32)
    out["decode"] = "decoded"
except DecodeError as err:
    out["decode"] = str(err)
import os
rows = {"abs_path": np.array(sys.argv[2:4], dtype=object), "image_id": np.array([p.rsplit("/", 1)[-1] for p in sys.argv[2:4]], dtype=object),
        "patient_id": np.array(["1", "1"], dtype=object), "split": np.array(["train", "train"], dtype=object),
        **{f: np.zeros(2, np.int8) for f in __import__("pipelines.labels").labels.FINDINGS}}
batch = _decode_batch(rows, 32, os.path.realpath(os.path.dirname(sys.argv[2])), None, ())
out["splits"] = list(batch["split"])
out["errors"] = list(batch["error"])
print(json.dumps(out))
"""


def test_a_dicom_bomb_is_refused_from_its_header_and_quarantined_without_allocating(tmp_path):
    """333 KB of RLE-compressed DICOM declaring 60000x60000 (pydicom's RLE decoder preallocates the
    whole frame: 6.7 GiB, what the issue measured) is refused from its header; in preprocessing's
    batch it becomes a failed row with that reason while the good image beside it decodes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(dicom_bytes(60000, 60000, _rle_zeros_frame(333_000), rle=True))
    assert bomb.stat().st_size < 400_000
    good = write_png(tmp_path / "good.png", chest_like(48))
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(repo), str(bomb), str(good)], capture_output=True,
                           text=True, timeout=120, env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert "60000x60000" in out["decode"] and "decompression-bomb limit" in out["decode"], out
    assert "MemoryError" not in out["decode"]
    assert out["splits"] == ["_failed", "train"]
    assert "decompression-bomb limit" in out["errors"][0] and out["errors"][1] == ""


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns between 1x and 2x the setting
def test_one_setting_caps_png_and_dicom_alike(tmp_path, monkeypatch):
    """PIL's Image.MAX_IMAGE_PIXELS, read at call time, governs both formats: PIL refuses above twice
    it, and so does the DICOM header check (Rows x Columns x frames)."""
    pixels = (chest_like(64).astype(np.uint16) * 16).astype(np.uint16)
    dicom = tmp_path / "x.dcm"
    dicom.write_bytes(dicom_bytes(64, 64, pixels.tobytes()))
    png = write_png(tmp_path / "x.png", chest_like(64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000
    for path in (dicom, png):
        with pytest.raises(DecodeError, match="limit"):
            decode_file(path, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2048)  # exactly at the limit: accepted, as PIL does
    for path in (dicom, png):
        assert decode_file(path, 32).pixels.shape == (32, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's "no limit" switches both off
    assert decode_file(dicom, 32).orig_width == 64


def test_frames_count_toward_the_dicom_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 64 x 64 fits under 8000; 64 x 64 x 4 frames does not
    data = dicom_bytes(64, 64, np.zeros(64 * 64 * 4, np.uint16).tobytes(), frames=4)
    (tmp_path / "f.dcm").write_bytes(data)
    with pytest.raises(DecodeError, match="4 frame"):
        decode_file(tmp_path / "f.dcm", 32)


def test_a_dicom_without_an_image_size_is_a_decode_error(tmp_path):
    data = dicom_bytes(8, 8, np.zeros(64, np.uint16).tobytes())
    pydicom = pytest.importorskip("pydicom")
    import io

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.Rows
    ds.save_as(tmp_path / "norows.dcm", enforce_file_format=True)
    with pytest.raises(DecodeError, match="Rows/Columns"):
        decode_file(tmp_path / "norows.dcm", 32)


@pytest.mark.parametrize("size", [0, 4097, 200_000])
def test_an_output_size_out_of_range_is_refused_before_any_decode(tmp_path, size):
    from pipelines.errors import UserInputError
    from pipelines.imaging import MAX_IMAGE_SIZE

    png = write_png(tmp_path / "x.png", chest_like(16))
    with pytest.raises(UserInputError, match=str(MAX_IMAGE_SIZE)):
        decode_file(png, size)
