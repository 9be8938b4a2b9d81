"""The Ray Serve application of ``cxr serve``: one deployment (``CxrModel``) with a FastAPI ingress.

Routes: ``POST /predict`` (the image file as the body; ``?gradcam=FINDING`` adds that finding's
Grad-CAM), ``GET /healthz``, ``GET /model`` (the checkpoint's ``model.json``, byte for byte).
Everything that does not need HTTP (decoding a body, the refusal reasons, scoring, the answer) is
``evaluation/serving.py``.

Batching: requests that arrive together are scored in one forward pass (``@serve.batch``: up to
``max_batch_size``; a batch waits ``batch_wait_ms`` for more while the model is idle, and until the
running pass should end while it is busy: ``evaluation.serving.batch_window_s``), so throughput rises with
concurrency. Every model call (a batch, a Grad-CAM) runs on one thread per replica, one at a time:
the event loop keeps reading and decoding the next requests meanwhile, and torch never runs two
passes at once on the replica's CPUs. With batching off each request is one forward pass of its own.

A Serve config file (``deploy/serve_config.yaml``, KubeRay's ``RayService``) names
``evaluation.serve:app_builder`` with ``args``: the fields of ``evaluation.serving.ServeApp``.
"""
# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations
# (Request, the query parameter) after Serve rewrites the methods, and string annotations lose it.
import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from evaluation.serving import Predictor, RequestError, ServeApp, app_settings, batch_window_s, check_size, find_finding

APP_NAME = "cxr"
logger = logging.getLogger("ray.serve")  # a replica's log file under Ray's session logs

api = FastAPI(title="cxr", summary="chest X-ray finding probabilities from one checkpoint",
              docs_url=None, redoc_url=None, openapi_url=None)  # no UI or schema routes: less to expose


def _error(reason: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """404, 405 ... as the same JSON error shape as every other refusal."""
    reason = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
    message = f"{request.method} {request.url.path}: {err.detail}; routes: POST /predict[?gradcam=FINDING], GET /healthz, GET /model"
    return _error(reason, message, err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return _error("bad_request", f"{request.method} {request.url.path}: {err.errors()}", 400)


@api.exception_handler(Exception)
async def _bug(request: Request, err: Exception) -> JSONResponse:
    """A bug in the server (never bad input: that is a RequestError): JSON like every other answer;
    the traceback goes to the replica's log."""
    logger.exception("cxr serve: %s %s failed", request.method, request.url.path)
    return _error("internal_error", f"internal error ({type(err).__name__}); the replica's log has the traceback", 500)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) one over ``max_bytes``: at once when its Content-Length says
    so (a client sending ``Expect: 100-continue``, as curl does for large files, never uploads it),
    else as soon as the bytes read pass the limit. What follows is read and dropped, up to the limit
    again, so the client reads the answer rather than a reset connection; memory stays bounded."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        check_size(int(declared), max_bytes)
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            break
        chunks.append(chunk)
    else:
        return b"".join(chunks)
    chunks.clear()
    drained = 0
    async for chunk in stream:
        drained += len(chunk)
        if drained > max_bytes:
            break
    check_size(size + drained, max_bytes)
    raise AssertionError("unreachable: check_size raises above the limit")


@serve.deployment
@serve.ingress(api)
class CxrModel:
    """One replica: the checkpoint loaded once (``Predictor``), a model thread, request counters."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.settings = app_settings(args)
        self.predictor = Predictor(Path(self.settings.checkpoint), "cuda" if self.settings.gpus_per_replica > 0 else None)
        self.predictor.warm_up()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model")
        self.score_batch.set_max_batch_size(self.settings.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        self.pass_started: float | None = None  # perf_counter() when the running forward pass began
        self.last_pass_s = 0.0  # how long the last one took
        self.counts: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.started = time.time()
        logger.info("cxr serve: %s (%s, %d px), batching %s", self.settings.checkpoint, self.predictor.identity["backbone"],
                    self.predictor.image_size, f"up to {self.settings.max_batch_size}" if self.settings.batching else "off")

    def _timed_score(self, images: list[np.ndarray]) -> tuple[list[dict[str, Any]], float]:
        started = time.perf_counter()
        rows = self.predictor.score(images)
        return rows, (time.perf_counter() - started) * 1000

    async def _run_model(self, images: list[np.ndarray]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Score ``images`` in one forward pass on the model thread; per image its row and timing."""
        self.pass_started = time.perf_counter()
        try:
            rows, model_ms = await asyncio.get_running_loop().run_in_executor(self.model_thread, self._timed_score, images)
        finally:
            self.pass_started = None
        self.last_pass_s = model_ms / 1000
        self.batch_sizes[len(images)] += 1
        timing = {"batch_size": len(images), "model_ms": round(model_ms, 2)}
        return [(row, timing) for row in rows]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # set from the settings in __init__
    async def score_batch(self, images: list[np.ndarray]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return await self._run_model(images)

    async def _score(self, pixels: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.settings.batching:
            # Read by the batcher when this request is the first of a new batch; ignored otherwise.
            window = batch_window_s(self.settings.batch_wait_ms / 1000, self.pass_started, self.last_pass_s, time.perf_counter())
            self.score_batch.set_batch_wait_timeout_s(window)
            return await self.score_batch(pixels)
        (one,) = await self._run_model([pixels])
        return one

    @api.post("/predict")
    async def predict(self, request: Request, gradcam: str | None = None) -> JSONResponse:
        """The image as the body; the JSON answer, or a 4xx JSON error naming the reason."""
        started = time.perf_counter()
        self.counts["requests"] += 1
        try:
            finding = None if gradcam is None else find_finding(gradcam, self.predictor.findings)
            data = await read_body(request, self.settings.max_bytes)
            upload = await asyncio.to_thread(self.predictor.decode, data)
            decode_ms = (time.perf_counter() - started) * 1000
            scored, timing = await self._score(upload.pixels)
            cam = None
            if finding is not None:
                probability = scored["probabilities"][self.predictor.findings[finding]]
                cam = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.predictor.gradcam, upload.pixels,
                                                                       finding, probability)
        except RequestError as err:
            self.counts[err.reason] += 1
            return _error(err.reason, err.message, err.status)
        except ClientDisconnect:  # the client left while sending the body: nobody reads an answer
            self.counts["client_disconnected"] += 1
            return _error("client_disconnected", "the client closed the connection before the body was complete", 400)
        self.counts["answered"] += 1
        timing = {**timing, "decode_ms": round(decode_ms, 2), "server_ms": round((time.perf_counter() - started) * 1000, 2)}
        return JSONResponse(self.predictor.answer(scored, upload, timing, cam))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/model")
    async def model(self) -> Response:
        """``model.json`` as the checkpoint holds it: its SHA-256 is the answers' ``model_json_sha256``."""
        return Response(self.predictor.model_json, media_type="application/json")

    def __del__(self) -> None:
        """On shutdown: this replica's counters into its log (the verb's summary shows them for one replica)."""
        if hasattr(self, "counts"):  # not when __init__ failed
            logger.info("cxr serve: replica stopping: %s", self.stats())
            self.model_thread.shutdown(wait=False)

    def stats(self) -> dict[str, Any]:
        """This replica's counters (through a handle; not an HTTP route)."""
        return {"uptime_s": time.time() - self.started, "counts": dict(self.counts),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def build_app(settings: ServeApp) -> Application:
    """The application for ``serve.run``: ``settings.replicas`` replicas, each reserving
    ``cpus_per_replica`` CPUs (and ``gpus_per_replica`` GPUs). The checkpoint is checked here, so a
    wrong path fails when the application is built, not in every replica."""
    from trainers.checkpoint import read_info

    checkpoint = Path(settings.checkpoint).resolve()
    read_info(checkpoint)
    args = {**settings.to_dict(), "checkpoint": str(checkpoint)}
    actor = {"num_cpus": settings.cpus_per_replica, **({"num_gpus": settings.gpus_per_replica} if settings.gpus_per_replica else {})}
    return CxrModel.options(num_replicas=settings.replicas, max_ongoing_requests=settings.max_ongoing_requests,
                            ray_actor_options=actor).bind(args)


def app_builder(args: dict[str, Any]) -> Application:
    """The Serve config file's entry point (``import_path: evaluation.serve:app_builder``): ``args``
    are ``ServeApp``'s fields (``checkpoint`` required)."""
    return build_app(app_settings(args))
