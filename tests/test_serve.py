"""``cxr serve`` (Ray Serve): the HTTP-independent parts without Ray, then the real verb on a free
loopback port with real HTTP requests and real NIH PNGs.

One server for the module: ``cxr serve`` runs as a subprocess (its own embedded Ray; this process
starts none) on a phantom-trained ResNet18 at 64 px with OOD statistics and the thresholds its run's
evaluation chose on validation (built in seconds, as ``tests/test_score.py`` builds its own). The
last test stops it with SIGINT, as Ctrl-C does, and reads its summary.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.serving import STATUS, RequestError, ServeApp, app_settings, batch_window_s, check_size, decode_upload, find_finding
from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from tests.helpers import chest_like, dicom_bytes

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
MAX_BYTES = 1_000_000  # the test server's --max-bytes: above every NIH PNG of the subset (at most ~0.7 MB)
READY_TIMEOUT_S = 600  # a guard against a hung start, not a timing assertion


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def bomb_png(side: int = 30_000) -> bytes:
    """A 60-byte PNG whose header declares ``side`` x ``side`` pixels: over PIL's decompression-bomb
    limit (twice ``Image.MAX_IMAGE_PIXELS``), refused before any pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- without Ray or HTTP

def test_each_bad_body_has_its_status_and_reason():
    good = png_bytes(chest_like(80))
    cases = {
        b"": ("empty_body", 400),
        b"this is a text file, not an image\n": ("unsupported_media_type", 415),
        b"--boundary\r\nContent-Disposition: form-data": ("unsupported_media_type", 415),  # a multipart form
        good[: len(good) // 2]: ("truncated_image", 422),
        good[:8] + b"\x00" * 40: ("corrupt_image", 422),  # PNG signature, then garbage
        bomb_png(): ("decompression_bomb", 422),
        dicom_bytes(64, 64, None): ("no_pixel_data", 422),
    }
    for body, (reason, status) in cases.items():
        with pytest.raises(RequestError) as caught:
            decode_upload(body, SIZE)
        assert (caught.value.reason, caught.value.status) == (reason, status), body[:20]
        assert caught.value.body() == {"error": caught.value.message, "reason": reason}
        assert all(400 <= code < 500 for reason, code in STATUS.items() if reason != "internal_error")


def test_bodies_are_known_by_content_and_decoded_as_preprocessing_does():
    from pipelines.imaging import decode_bytes

    pixels = chest_like(96)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    for body, kind in ((png_bytes(pixels), "png"), (jpeg.getvalue(), "jpeg"), (dicom_bytes(96, 96, pixels.tobytes(), bits=(8, 8)), "dicom")):
        upload = decode_upload(body, SIZE)
        assert (upload.format, upload.width, upload.height, upload.bytes) == (kind, 96, 96, len(body))
        assert np.array_equal(upload.pixels, decode_bytes(body, SIZE).pixels)


def test_body_limit_finding_names_and_app_args():
    check_size(MAX_BYTES, MAX_BYTES)
    with pytest.raises(RequestError, match="over this server's limit") as caught:
        check_size(MAX_BYTES + 1, MAX_BYTES)
    assert caught.value.status == 413
    assert find_finding("Effusion", FINDINGS) == find_finding("effusion", FINDINGS) == FINDINGS.index("Effusion")
    assert find_finding("pleural thickening", FINDINGS) == FINDINGS.index("Pleural_Thickening")
    with pytest.raises(RequestError, match="one of: Atelectasis") as caught:
        find_finding("Fracture", FINDINGS)
    assert (caught.value.reason, caught.value.status) == ("unknown_finding", 400)
    assert app_settings({"checkpoint": "ckpt", "max_batch_size": 4}) == ServeApp(checkpoint="ckpt", max_batch_size=4)
    with pytest.raises(UserInputError, match="unknown arg.*'batch_size'.*known: batch_wait_ms"):
        app_settings({"checkpoint": "ckpt", "batch_size": 4})
    with pytest.raises(UserInputError, match="max_batch_size"):
        ServeApp(checkpoint="ckpt", max_batch_size=0)
    assert ServeApp(checkpoint="ckpt", max_batch_size=16).max_ongoing_requests == 32  # a batch forms while one is scored


def test_a_batch_waits_for_company_while_the_model_is_busy_and_briefly_while_it_is_idle():
    assert batch_window_s(0.01, None, 0.5, now=100.0) == 0.01  # idle: the configured wait
    assert batch_window_s(0.01, 99.8, 0.5, now=100.0) == pytest.approx(0.3)  # busy: until the running pass should end
    assert batch_window_s(0.01, 99.0, 0.5, now=100.0) == 0.01  # overdue pass: no less than the configured wait


def test_the_verb_refuses_a_busy_port_and_a_missing_checkpoint(tmp_path, capsys):
    """Both fail before Ray starts serving, with one line."""
    from cxr.stages import _check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserInputError, match="another server uses it; choose another with --port"):
            _check_port("127.0.0.1", busy.getsockname()[1])
    from evaluation.serve import build_app

    with pytest.raises(FileNotFoundError, match="not a cxr checkpoint directory"):
        build_app(ServeApp(checkpoint=str(tmp_path / "nothing")))


# --------------------------------------------------------------------------- the real server


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A phantom run's train/best: a 2-epoch ResNet18 at 64 px, ood.npz, and eval/ (validation thresholds)."""
    from evaluation import evaluate_run
    from pipelines.phantoms import make_collection
    from tests.test_eval_fixtures import train_tiny, write_run
    from trainers.ood import record_ood

    root = tmp_path_factory.mktemp("serve") / "run"
    collection = make_collection(root / "phantoms", n_patients=40, image_size=SIZE, seed=1)
    run = write_run(root, collection.labels_csv, collection.images, SIZE, 0.25, 0.35, 3, seed=1)
    train_tiny(run, epochs=2)
    record_ood(run.train_best, run)
    evaluate_run(run, n_boot=20, robustness=False)
    return run.train_best


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint) -> Server:
    """``cxr serve CKPT --port FREE`` on loopback, ready; stopped with SIGINT at the end (if a test
    has not already), so its Ray shuts down cleanly."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cxr.cli", "serve", str(checkpoint), "--port", str(port), "--max-batch-size", "8",
               "--batch-wait-ms", "100", "--max-bytes", str(MAX_BYTES)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(f"http://127.0.0.1:{port}", port, process)
    threading.Thread(target=lambda: server.output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "serve: ready" not in server.text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill() if process.poll() is None else None
            pytest.fail(f"cxr serve did not start (exit {process.poll()}):\n{server.text()}")
        time.sleep(0.5)
    yield server
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=60)


def call(server: Server, path: str, body: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(server.url + path, data=body, method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def predict(server: Server, body: bytes, query: str = "") -> tuple[int, dict]:
    status, raw = call(server, "/predict" + query, body)
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def nih_files(nih) -> list[Path]:
    return sorted((nih / "images").glob("*.png"))[:12]


@pytest.mark.ray
def test_it_listens_on_loopback_only_and_answers_health_and_model(server, checkpoint):
    import psutil

    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
    assert listening and {c.laddr.ip for c in listening} <= {"127.0.0.1", "::1"}, listening
    assert "curl --data-binary @IMAGE.png " + server.url + "/predict" in server.text()
    assert call(server, "/healthz") == (200, b'{"status":"ok"}')
    status, raw = call(server, "/model")
    assert status == 200 and raw == (checkpoint / "model.json").read_bytes()


@pytest.mark.ray
@pytest.mark.realdata
def test_probabilities_equal_cxr_predict_on_real_nih_pngs(server, checkpoint, nih_files):
    from evaluation.predict import predict_images

    expected = predict_images(checkpoint, nih_files).set_index("image")
    model_json = hashlib.sha256((checkpoint / "model.json").read_bytes()).hexdigest()
    for path in nih_files:
        status, answer = predict(server, path.read_bytes())
        assert status == 200, answer
        row = expected.loc[str(path)]
        assert list(answer["probabilities"]) == list(FINDINGS)
        got = np.array([answer["probabilities"][f] for f in FINDINGS])
        np.testing.assert_allclose(got, row[[f"prob_{f}" for f in FINDINGS]].to_numpy(float), atol=1e-5, rtol=0)
        assert isinstance(answer["ood"], bool) and answer["ood"] == bool(row["ood"]) and answer["ood_score"] == pytest.approx(float(row["ood_score"]), abs=1e-4)
        thresholds = answer["thresholds"]["values"]
        assert thresholds and answer["above_threshold"] == sorted((f for f, t in thresholds.items() if answer["probabilities"][f] >= t),
                                                                  key=lambda f: -answer["probabilities"][f])
        assert answer["model"]["model_json_sha256"] == model_json
        assert answer["model"]["backbone"] == "resnet18" and answer["model"]["image_size"] == SIZE
        assert answer["model"]["training_run"] == str(checkpoint.parent.parent.resolve())
        assert answer["input"]["format"] == "png" and answer["input"]["bytes"] == path.stat().st_size
        assert answer["timing"]["batch_size"] >= 1 and answer["timing"]["server_ms"] > 0


@pytest.mark.ray
@pytest.mark.realdata
def test_jpeg_and_dicom_bodies_are_known_by_content(server, checkpoint, nih_files, tmp_path):
    from evaluation.predict import predict_images

    path = next(p for p in nih_files if Image.open(p).mode == "L")
    pixels = np.asarray(Image.open(path))
    jpeg = tmp_path / "image.jpg"
    Image.fromarray(pixels).save(jpeg, quality=90)
    dicom = dicom_bytes(*pixels.shape, pixels.tobytes(), bits=(8, 8))  # the PNG's very pixels
    expected = predict_images(checkpoint, [jpeg, path])
    for body, kind, row in ((jpeg.read_bytes(), "jpeg", 0), (dicom, "dicom", 1)):
        status, answer = predict(server, body)
        assert status == 200 and answer["input"]["format"] == kind, answer
        got = [answer["probabilities"][f] for f in FINDINGS]
        np.testing.assert_allclose(got, expected.loc[row, [f"prob_{f}" for f in FINDINGS]].to_numpy(float), atol=1e-5, rtol=0)


@pytest.mark.ray
def test_gradcam_comes_back_as_a_png(server):
    image = png_bytes(chest_like(256, seed=3))
    status, answer = predict(server, image, "?gradcam=effusion")
    assert status == 200, answer
    cam = answer["gradcam"]
    assert cam["finding"] == "Effusion" and cam["probability"] == answer["probabilities"]["Effusion"]
    overlay = Image.open(io.BytesIO(base64.b64decode(cam["png_base64"])))
    assert overlay.format == "PNG" and overlay.width > 256 and overlay.height > 256
    assert "gradcam" not in predict(server, image)[1]


@pytest.mark.ray
@pytest.mark.realdata
def test_concurrent_requests_are_batched_and_scored_alike(server, nih_files):
    single = {p: predict(server, p.read_bytes())[1]["probabilities"] for p in nih_files[:8]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: (p, predict(server, p.read_bytes())), [*nih_files[:8]] * 3))
    assert all(status == 200 for _, (status, _) in answers)
    sizes = [answer["timing"]["batch_size"] for _, (_, answer) in answers]
    assert max(sizes) > 1, sizes  # 8 clients at once, a 100 ms batch window: some requests share a forward pass
    for path, (_, answer) in answers:
        np.testing.assert_allclose([answer["probabilities"][f] for f in FINDINGS], [single[path][f] for f in FINDINGS], atol=1e-5, rtol=0)


def _raw_post(server: Server, headers: dict[str, str], body=None, chunked: bool = False) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request("POST", "/predict", body=body, headers=headers, encode_chunked=chunked)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


@pytest.mark.ray
def test_bad_inputs_get_4xx_json_naming_the_reason_and_the_server_keeps_answering(server):
    good = png_bytes(chest_like(256, seed=4))
    cases = [
        ("empty body", b"", "", 400, "empty_body"),
        ("text", b"this is a text file, not an image\n", "", 415, "unsupported_media_type"),
        ("truncated PNG", good[: len(good) // 2], "", 422, "truncated_image"),
        ("decompression bomb", bomb_png(), "", 422, "decompression_bomb"),
        ("DICOM without pixel data", dicom_bytes(64, 64, None), "", 422, "no_pixel_data"),
        ("unknown Grad-CAM finding", good, "?gradcam=Fracture", 400, "unknown_finding"),
        ("body over --max-bytes", good * (MAX_BYTES // len(good) + 1), "", 413, "body_too_large"),
    ]
    for name, body, query, status, reason in cases:
        got, answer = predict(server, body, query)
        assert (got, answer.get("reason")) == (status, reason), f"{name}: {got} {answer}"
        assert answer["error"], name
    # over the limit by Content-Length alone: refused before a byte of the body is read
    assert _raw_post(server, {"Content-Length": str(MAX_BYTES + 1)})[1]["reason"] == "body_too_large"
    # over the limit without a length (chunked): refused once the bytes read pass it
    status, answer = _raw_post(server, {}, iter([good] * (MAX_BYTES // len(good) + 2)), chunked=True)
    assert (status, answer["reason"]) == (413, "body_too_large")
    assert call(server, "/nothing")[0] == 404 and json.loads(call(server, "/nothing")[1])["reason"] == "not_found"
    assert call(server, "/predict", method="GET")[0] == 405
    # still serving, and still right
    assert call(server, "/healthz") == (200, b'{"status":"ok"}')
    assert predict(server, good)[0] == 200


@pytest.mark.ray
def test_ctrl_c_stops_serve_cleanly_with_a_summary(server):
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=180) == 0, server.text()
    time.sleep(0.5)  # the reader thread takes the last lines
    out = server.text()
    assert "serve: shutting down" in out and "serve: stopped after" in out
    assert "refused (" in out and "body_too_large" in out and "forward pass(es)" in out
    assert "cxr serve: done in" in out
    assert "Traceback" not in out and "(raylet)" not in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
