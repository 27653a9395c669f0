"""The HTTP service (FastAPI): translates the OpenAI Images API into the batching engine, and nothing more.

POST /v1/images/generations (text to image), POST /v1/images/edits (image to image, inpainting, outpainting; a
JSON body with base64 images, see schema.py), GET /healthz (alive), /readyz (loaded and warmed up), /metrics
(Prometheus). Errors are JSON {"error": {"message", "type", "param"}}: 400/413/422 bad input, 429 + Retry-After
queue full, 501 a task the artifacts were not exported for, 503 not ready or shutting down, 504 past the
deadline. A client that disconnects cancels its request at the next step boundary. Needs the `serve` extra
(fastapi, uvicorn, prometheus-client).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import math
import os
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from k3trt.contract.errors import ArtifactError, BackendBusyError, K3TRTError
from k3trt.runtime.denoise_loop import GenerationCancelled
from k3trt.runtime.serving.engine import (
    BatchingEngine,
    DeadlineExceededError,
    EngineConfig,
    NotAcceptingError,
    QueueFullError,
)
from k3trt.runtime.serving.schema import (
    MAX_BODY_BYTES,
    MAX_EDIT_BODY_BYTES,
    BodyError,
    FieldError,
    Limits,
    parse_body,
    to_edit,
    to_request,
)
from k3trt.runtime.serving.telemetry import ServiceMetrics

log = logging.getLogger("k3trt")
DISCONNECT_POLL_S = 0.25
REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (replicas behind Ray Serve differ)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    artifacts: str
    backend: str = "ort"
    precision: str | None = None
    backend_options: tuple = ()  # (name, value) pairs for the backend, e.g. (("threads", 2),)
    scheduler: str = "ddpm"
    max_batch: int = 4
    max_queue: int = 32
    timeout_s: float = 300.0  # per-request deadline
    default_size: str = "1024x1024"
    default_steps: int = 25
    max_n: int = 4
    warmup: bool = True
    grace_s: float = 30.0  # on shutdown: how long running requests may finish


class ImageService:
    """A pipeline, its batching engine and metrics: loaded in the background, ready after a warm-up."""

    def __init__(self, settings: ServeSettings, pipeline=None):
        self.settings, self.pipeline = settings, pipeline
        self.metrics = ServiceMetrics()
        self.engine: BatchingEngine | None = None
        self.limits = Limits(default_size=settings.default_size, default_steps=settings.default_steps,
                             max_n=settings.max_n)
        self.load_error: str | None = None
        self.recent_latency_s = 5.0  # moving average of answered requests (for Retry-After)
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and self.engine.accepting

    def load(self) -> None:
        """Open the artifacts, start the engine, warm up at the smallest size; errors are kept for /readyz."""
        try:
            from k3trt.runtime.pipeline import Pipeline

            s = self.settings
            if self.pipeline is None:
                precision = s.precision or ("default" if s.backend == "trt" else "fp32")
                self.pipeline = Pipeline.from_artifacts(s.artifacts, s.backend, precision, scheduler=s.scheduler,
                                                        **dict(s.backend_options))
            unet = self.pipeline.backend.record("unet")
            lo, hi = unet.axes.get("height", (8, 256))
            self.limits = dataclasses.replace(self.limits, min_side=max(64, -(-lo * 8 // 64) * 64),
                                              max_side=hi * 8 // 64 * 64)
            config = EngineConfig(max_batch=s.max_batch, max_queue=s.max_queue)
            self.engine = BatchingEngine(self.pipeline, config, self.metrics).start()
            if s.warmup:
                side = self.limits.min_side
                self.engine.generate("warm-up", steps=1, height=side, width=side, timeout_s=s.timeout_s)
            self._ready.set()
            log.warning("k3trt serve: ready (%s, max batch %d)", s.artifacts, s.max_batch)
        except Exception as exc:  # noqa: BLE001 - kept and shown by /readyz; the process stays up for probes
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("k3trt serve: loading failed: %s", self.load_error)

    def stop_admitting(self) -> None:
        self._ready.clear()

    def shutdown(self) -> None:
        self._ready.clear()
        if self.engine is not None:
            self.engine.stop(self.settings.grace_s)


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def create_app(service: ImageService, *, load_in_background: bool = True):
    """The FastAPI application around `service` (which it loads at start-up unless already loaded)."""
    import contextlib

    def fail(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
        service.metrics.requests.labels(str(status)).inc()
        return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if service.engine is None and service.load_error is None:
            if load_in_background:  # /healthz answers while the models load
                threading.Thread(target=service.load, name="k3trt-load", daemon=True).start()
            else:
                await asyncio.to_thread(service.load)
        yield
        await asyncio.to_thread(service.shutdown)

    app = FastAPI(title="k3trt", summary="Kandinsky 3 images (OpenAI Images API shape)", lifespan=lifespan)
    app.state.service = service

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if service.ready:
            return {"status": "ready"}
        reason = service.load_error or ("shutting down" if service.engine and not service.engine.accepting
                                        else "loading")
        return JSONResponse(error_body(503, f"not ready: {reason}", "unavailable"), status_code=503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    async def _admitted(parse):
        """(what `parse()` returned, None), or (None, the refusal): bad input (400/413/422) before readiness
        (503), so a malformed request gets the same answer whether or not the service has finished loading."""
        try:
            parsed = await parse()
        except BodyError as exc:
            return None, fail(exc.status, str(exc), "invalid_request_error")
        except FieldError as exc:
            return None, fail(422, str(exc), "invalid_request_error", exc.param)
        except K3TRTError as exc:
            return None, fail(422, str(exc), "invalid_request_error")
        if not service.ready:
            return None, fail(503, "the service is not ready (loading, failed to load, or shutting down)",
                              "unavailable", headers={"Retry-After": "5"})
        return parsed, None

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        started = time.monotonic()

        async def parse():
            return to_request(parse_body(await _read_capped(request)), service.limits)

        job_request, refusal = await _admitted(parse)
        if refusal is not None:
            return refusal
        return await _run(request, job_request, started)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """Image to image, or inpainting with `mask`, or outpainting with `outpaint`: schema.to_edit."""
        started = time.monotonic()

        async def parse():
            raw = await _read_capped(request, MAX_EDIT_BODY_BYTES)
            body = await asyncio.to_thread(parse_body, raw, MAX_EDIT_BODY_BYTES)
            return await asyncio.to_thread(to_edit, body, service.limits)  # decodes the images

        parsed, refusal = await _admitted(parse)
        if refusal is not None:
            return refusal
        job_request, task = parsed
        return await _run(request, job_request, started, task=task, param="image")

    async def _run(request, job_request, started: float, *, task=None, param: str = "size"):
        try:
            job = service.engine.submit(job_request, timeout_s=service.settings.timeout_s, task=task)
        except QueueFullError as exc:
            return fail(429, str(exc), "rate_limit_error", headers={"Retry-After": _retry_after(service)})
        except NotAcceptingError as exc:
            return fail(503, str(exc), "unavailable", headers={"Retry-After": "5"})
        except ArtifactError as exc:  # a task whose components this deployment's artifacts lack
            return fail(501, str(exc), "not_implemented_error")
        except K3TRTError as exc:  # shape checks against the artifacts
            return fail(422, str(exc), "invalid_request_error", param)
        future = asyncio.wrap_future(job.future)
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if not future.done() and await request.is_disconnected():
                    job.cancel()  # takes effect at the next step boundary
                    service.metrics.requests.labels("499").inc()
                    return Response(status_code=499)
        except asyncio.CancelledError:  # the server gave up on this request (shutdown past its grace)
            job.cancel()
            raise
        try:
            images = future.result()
        except DeadlineExceededError as exc:
            return fail(504, str(exc), "timeout")
        except GenerationCancelled as exc:
            return fail(503, str(exc), "unavailable")
        except BackendBusyError as exc:
            return fail(503, str(exc), "unavailable", headers={"Retry-After": "2"})
        except K3TRTError as exc:
            log.error("request %d failed: %s", job.id, exc)
            return fail(500, str(exc), "server_error")
        if job.queue_wait is not None:
            service.metrics.queue_wait.observe(job.queue_wait)
        data = await asyncio.to_thread(_png_items, images, job_request.seed)
        service.metrics.requests.labels("200").inc()
        service.metrics.images.inc(len(data))
        elapsed = time.monotonic() - started
        service.metrics.latency.observe(elapsed)
        service.recent_latency_s = 0.8 * service.recent_latency_s + 0.2 * elapsed
        return JSONResponse({"created": int(time.time()), "data": data}, headers={"x-k3trt-replica": REPLICA})

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # never a traceback to the client
        log.exception("unexpected error")
        return fail(500, f"internal error ({type(exc).__name__})", "server_error")

    return app


async def _read_capped(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read no further than one chunk past `limit` (a huge body is refused, not buffered)."""
    from k3trt.runtime.serving.schema import too_large

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break  # parse_body refuses it with 413
    return b"".join(chunks)


def _png_items(images, seed: int) -> list[dict]:
    from k3trt.runtime.pipeline import to_pil

    items = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        items.append({"b64_json": base64.b64encode(buffer.getvalue()).decode(), "seed": seed})
    return items


def _retry_after(service: ImageService) -> str:
    """Seconds until a queue slot is likely free: the recent mean request latency, at least 1."""
    return str(max(1, math.ceil(service.recent_latency_s)))
