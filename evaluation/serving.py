"""The HTTP-independent half of ``cxr serve``: the application's settings, turning a request body
into the checkpoint's pixels (with a status code and a reason for every way that fails), scoring,
Grad-CAM, and the JSON answer.

``evaluation/serve.py`` puts this behind Ray Serve and FastAPI; everything here runs, and is tested,
without either. The model side is ``evaluation.scoring.Scorer``, the code path of ``cxr predict``
and ``cxr score``: the same decode (``pipelines.imaging.decode_bytes`` at the checkpoint's size),
the same forward pass, the same OOD fields and operating-point thresholds.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UserInputError
from pipelines.imaging import DecodeError, decode_bytes, sniff_format
from pipelines.options import Settings, option, require

DEFAULT_MAX_BYTES = 50_000_000  # 50 MB: a DICOM of a large detector (3000x3000, 16 bit, uncompressed) is ~18 MB
ACCEPTED = ("png", "jpeg", "dicom")

# Every refusal: reason -> HTTP status. Client errors are 4xx; a 500 is a bug in the server.
STATUS = {
    "empty_body": 400,
    "unknown_finding": 400,
    "bad_request": 400,
    "client_disconnected": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "truncated_image": 422,
    "corrupt_image": 422,
    "decompression_bomb": 422,
    "no_pixel_data": 422,
    "internal_error": 500,
}
# pipelines.imaging.DecodeError.kind -> reason (the body was sniffed as PNG/JPEG/DICOM already).
DECODE_REASONS = {
    "empty": "empty_body",
    "unrecognized": "corrupt_image",
    "truncated": "truncated_image",
    "corrupt": "corrupt_image",
    "unreadable": "corrupt_image",
    "too_large": "decompression_bomb",
    "no_pixels": "no_pixel_data",
}


@dataclass
class ServeApp(Settings):
    """The Serve application of ``cxr serve`` (and the ``args`` of ``evaluation.serve:app_builder``
    in a Serve config file): which model, how many replicas, how requests are batched."""

    checkpoint: str = option(help="checkpoint directory (model.pt + model.json; ood.npz and its run's validation thresholds when present)",
                             positional=True)
    replicas: int = option(1, "model replicas, each loading the model once", metavar="N")
    max_batch_size: int = option(8, "most requests scored in one forward pass (server-side batching)", metavar="N")
    batch_wait_ms: float = option(10.0, "how long a batch waits for more requests before it is scored", metavar="MS")
    batching: bool = option(True, "server-side batching (--no-batching: each request scored alone)")
    max_bytes: int = option(DEFAULT_MAX_BYTES, "largest request body accepted (bytes); a larger one gets 413", metavar="N")
    cpus_per_replica: float = option(0.5, "CPUs each replica reserves; fractional leaves room for Serve's proxy and controller on a small machine",
                                     metavar="C")
    gpus_per_replica: float = option(0.0, "GPUs each replica reserves (0: score on the CPU)", metavar="G")

    def check(self) -> None:
        require(bool(str(self.checkpoint).strip()), "{checkpoint} must name a checkpoint directory")
        require(self.replicas >= 1 and self.max_batch_size >= 1,
                f"{{replicas}} and {{max_batch_size}} must be >= 1, got {self.replicas} and {self.max_batch_size}")
        require(0 <= self.batch_wait_ms <= 10_000, f"{{batch_wait_ms}} must be between 0 and 10000, got {self.batch_wait_ms}")
        require(self.max_bytes >= 1024, f"{{max_bytes}} must be at least 1024, got {self.max_bytes}")
        require(self.cpus_per_replica > 0 and self.gpus_per_replica >= 0,
                f"{{cpus_per_replica}} must be > 0 and {{gpus_per_replica}} >= 0, got {self.cpus_per_replica} and {self.gpus_per_replica}")

    @property
    def max_ongoing_requests(self) -> int:
        """Requests a replica holds at once: two batches' worth, so one forms while the other is scored
        (Serve's default of 5 would cap a batch at 5)."""
        return max(2 * self.max_batch_size, 8)


def app_settings(args: dict[str, Any]) -> ServeApp:
    """A Serve config file's ``args`` as ``ServeApp``; an unknown key is an error naming the valid ones."""
    if not isinstance(args, dict):
        raise UserInputError(f"the application's args must be a mapping, got {type(args).__name__}")
    known = set(ServeApp.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserInputError(f"unknown arg(s) {', '.join(map(repr, unknown))} for evaluation.serve:app_builder; known: {', '.join(sorted(known))}")
    return ServeApp(**args)


def batch_window_s(wait_s: float, pass_started: float | None, last_pass_s: float, now: float) -> float:
    """How long a batch that starts ``now`` may wait for company: ``wait_s`` while the model is idle
    (``pass_started`` None); while a pass runs, until that pass should end (it started at
    ``pass_started`` and should take as long as the last one), and never less than ``wait_s``.

    ``@serve.batch`` closes a batch when its window ends, whether or not the model is free, and
    queues it. With a fixed window shorter than a forward pass the batches under load are only as
    large as the arrivals in one window (measured: 1.2 requests on average with 8 clients and 10 ms)
    and wait one behind the other. Waiting while the model is busy costs no latency: the batch could
    not start sooner."""
    if pass_started is None:
        return wait_s
    return max(wait_s, pass_started + last_pass_s - now)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a machine-readable ``reason`` and a message
    that says what was wrong and what to send instead."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, STATUS[reason]

    def body(self) -> dict[str, str]:
        return {"error": self.message, "reason": self.reason}


def check_size(size: int, max_bytes: int) -> None:
    """413 for a body (declared or read so far) over the limit."""
    if size > max_bytes:
        raise RequestError("body_too_large", f"the request body is {size} bytes or more, over this server's limit of {max_bytes} "
                                             f"bytes (cxr serve --max-bytes)")


@dataclass(frozen=True)
class Upload:
    """One request's image, decoded at the checkpoint's size."""

    pixels: np.ndarray  # (S, S) uint8
    format: str  # png, jpeg, dicom: from the content
    bytes: int
    width: int
    height: int

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "bytes": self.bytes, "width": self.width, "height": self.height}


def decode_upload(data: bytes, image_size: int) -> Upload:
    """The body's pixels, decoded as preprocessing decodes files; a RequestError naming the reason
    when the body is empty, not a PNG/JPEG/DICOM (by its content: any name or content type the
    client gave is ignored), truncated, corrupt, a decompression bomb or a DICOM without pixels."""
    if not data:
        raise RequestError("empty_body", "the request body is empty: POST the image file's bytes (PNG, JPEG or DICOM) as the body, "
                                         "e.g. curl --data-binary @image.png")
    kind = sniff_format(data)
    if kind is None:
        raise RequestError("unsupported_media_type", f"the body is not a PNG, JPEG or DICOM file (it starts with {bytes(data[:12])!r}): "
                                                     f"send the file's bytes as they are (curl --data-binary @FILE), not a form, "
                                                     f"base64 or a file name")
    try:
        decoded = decode_bytes(data, image_size)
    except DecodeError as err:
        raise RequestError(DECODE_REASONS.get(err.kind, "corrupt_image"), f"{kind.upper()} body: {err}") from None
    return Upload(decoded.pixels, kind, len(data), decoded.orig_width, decoded.orig_height)


def find_finding(name: str, findings: list[str]) -> int:
    """The index of ``?gradcam=NAME`` among the model's findings (case, spaces and underscores
    forgiven); 400 naming the valid ones otherwise."""
    wanted = name.strip().lower().replace(" ", "_")
    for j, finding in enumerate(findings):
        if finding.lower() == wanted:
            return j
    raise RequestError("unknown_finding", f"gradcam={name!r} is not a finding of this model; one of: {', '.join(findings)}")


def _number(value: Any) -> float | None:
    """A JSON-safe float: None for a missing or undefined value (no NaN in the answer)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def model_identity(checkpoint: Path, info: dict, run_root: Path | None) -> dict[str, Any]:
    """What a client logs beside each answer to know which model gave it."""
    from pipelines.lineage import file_sha256
    from pipelines.rundir import INFO_FILE, MODEL_FILE

    checkpoint = Path(checkpoint).resolve()
    return {"checkpoint": str(checkpoint), "backbone": info["backbone"], "image_size": int(info["image_size"]),
            "epoch": info.get("epoch"), "training_run": str(run_root) if run_root is not None else None,
            "model_json_sha256": file_sha256(checkpoint / INFO_FILE), "model_pt_sha256": file_sha256(checkpoint / MODEL_FILE)}


class Predictor:
    """A checkpoint loaded once for a server: decode a body, score a batch, draw a Grad-CAM, answer.

    Thresholds are those ``cxr evaluate`` chose on validation for this very checkpoint, when it is
    its run's ``train/best`` or ``tune/best`` (``evaluation.scoring.read_thresholds``); else none,
    and the answer has probabilities only."""

    def __init__(self, checkpoint: Path, device: str | None = None) -> None:
        from evaluation.scoring import Scorer, read_thresholds, run_of_checkpoint
        from trainers.checkpoint import read_info

        checkpoint = Path(checkpoint)
        info = read_info(checkpoint)
        run = run_of_checkpoint(checkpoint)
        thresholds = read_thresholds(run, checkpoint, list(info["findings"]))
        self.scorer = Scorer(checkpoint, thresholds, device)
        self.identity = model_identity(checkpoint, self.scorer.info, run.root if run is not None else None)
        self.model_json = (checkpoint / "model.json").read_bytes()

    @property
    def findings(self) -> list[str]:
        return self.scorer.findings

    @property
    def image_size(self) -> int:
        return self.scorer.image_size

    def decode(self, data: bytes) -> Upload:
        return decode_upload(data, self.image_size)

    def score(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """One forward pass over ``images`` (each ``(S, S)`` uint8); per image its probabilities, the
        findings above their thresholds (None without thresholds) and the OOD fields."""
        scores = self.scorer.score(np.stack(images))
        thresholds = self.scorer.thresholds
        out = []
        for i in range(len(images)):
            probs = {f: float(scores[f"prob_{f}"][i]) for f in self.findings}
            above = None
            if thresholds is not None:
                above = sorted((f for f, t in thresholds.values.items() if probs[f] >= t), key=lambda f: -probs[f])
            ood = scores["ood"][i]
            out.append({"probabilities": probs, "above_threshold": above,
                        "ood": None if ood is None else bool(ood), "ood_score": _number(scores["ood_score"][i])})
        return out

    def gradcam(self, pixels: np.ndarray, finding: int, probability: float) -> dict[str, Any]:
        """The Grad-CAM of one finding on one image: the overlay ``cxr explain`` draws (the image as
        the model sees it, then the heatmap over it), as a base64 PNG."""
        from evaluation.gradcam import HeatmapMaker
        from evaluation.overlay import Panel, compose

        name = self.findings[finding]
        threshold = self.scorer.thresholds.values.get(name) if self.scorer.thresholds else None
        with HeatmapMaker(self.scorer.model, self.scorer.info) as maker:
            heatmap = maker.heatmaps(pixels[None], [finding])[0]
        caption = f"p {probability:.3f}" + (f" (threshold {threshold:.3f})" if threshold is not None else " (no threshold)")
        buffer = io.BytesIO()
        compose(pixels, [Panel(name, heatmap, caption)], f"Grad-CAM of {name}").save(buffer, format="PNG")
        return {"finding": name, "probability": probability, "threshold": threshold,
                "png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}

    def warm_up(self) -> None:
        """One forward pass and one Grad-CAM of a blank image, so that the first request does not pay
        for torch's first call and the lazy imports of Grad-CAM and the overlay (seconds)."""
        blank = np.zeros((self.image_size, self.image_size), np.uint8)
        (row,) = self.score([blank])
        self.gradcam(blank, 0, row["probabilities"][self.findings[0]])

    def answer(self, scored: dict[str, Any], upload: Upload, timing: dict[str, Any], gradcam: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON body of ``POST /predict``."""
        thresholds = self.scorer.thresholds
        out = {**scored,
               "thresholds": None if thresholds is None else {"values": thresholds.values, "rule": thresholds.rule, "chosen_on": "val",
                                                              "no_threshold": thresholds.missing},
               "input": upload.to_json(), "model": self.identity, "timing": timing}
        if gradcam is not None:
            out["gradcam"] = gradcam
        return out
