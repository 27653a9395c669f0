"""The HTTP service (FastAPI): translates the OpenAI Images API into the batching engine, and nothing more.

Routes (docs/serving.md): POST /v1/images/generations (text to image), POST /v1/images/edits (image to image,
inpainting, outpainting; OpenAI's multipart form or JSON with base64 images), GET /v1/models, the asynchronous
job API under /v1/jobs (jobs_api.py), GET /healthz (liveness: fails after a fatal load error), /readyz (loaded,
warmed up, not draining), /metrics (Prometheus). Errors use OpenAI's envelope {"error": {"message", "type",
"param", "code", "request_id"}}: 400 bad input (413 too large, 408 body too slow), 401 API key, 429 +
Retry-After queue full, 501 a task the artifacts were not exported for, 503 not ready / draining (with
Retry-After) or failed to load (without), 504 past the deadline. A client that disconnects cancels its request
at the next step boundary (status 499 in the logs and metrics). Needs the `serve` extra.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import socket
import threading
import time
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from k3trt.contract.errors import InvalidArgumentError, K3TRTError
from k3trt.runtime.serving.adapters import BASE_MODEL as MODEL_ID
from k3trt.runtime.serving.adapters import AdapterStates, register_adapters
from k3trt.runtime.serving.engine import BatchingEngine, EngineConfig, NotAcceptingError
from k3trt.runtime.serving.image_work import ImageWork, answer_for
from k3trt.runtime.serving.middleware import RequestMiddleware, error_payload, note
from k3trt.runtime.serving.openai_options import IGNORED_HEADER, output_options
from k3trt.contract.manifest import MANIFEST_NAME, Manifest
from k3trt.runtime.pipeline import Pipeline
from k3trt.runtime.serving.forms import is_multipart, parse_form
from k3trt.runtime.serving.jobs import JobStore
from k3trt.runtime.serving.animation_jobs import add_animation_routes
from k3trt.runtime.serving.jobs_api import add_job_routes
from k3trt.runtime.serving.openapi import describe_routes
from k3trt.runtime.serving.schema import (MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES, BodyError, FieldError, Limits, _size,
                                          parse_body, to_edit, to_request, too_large)
from k3trt.runtime.serving.streaming import event_stream
from k3trt.runtime.serving.telemetry import ServiceMetrics

log = logging.getLogger("k3trt")
DISCONNECT_POLL_S = 0.25
REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (replicas behind Ray Serve differ)
MAX_RETRY_AFTER_S = 30  # every Retry-After is at most this; the keep-alive must outlast it


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    artifacts: str
    backend: str = "ort"  # the Python settings; `k3trt serve` defaults to --backend auto
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
    drain_s: float = 0.0  # on SIGTERM: how long /readyz answers 503 with the socket still open, before closing it
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    keep_alive_s: float = 75.0  # idle keep-alive connections; longer than any Retry-After
    api_key: str | None = None
    cors_allow_origins: tuple = ()
    max_jobs: int = 64
    job_ttl_s: float = 600.0
    loras: tuple = ()  # (NAME, "PATH[:SCALE]") pairs: model "kandinsky-3+NAME" (adapters.py)
    lora_cache: int = 2  # adapter pipelines held at once (LRU)

    def __post_init__(self):
        for name in ("timeout_s", "grace_s", "drain_s", "body_timeout_s", "keep_alive_s", "job_ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise InvalidArgumentError(f"{name}={value!r}", accepted="a finite number of seconds >= 0",
                                           fix=f"--{name[:-2].replace('_', '-')} 30")
        if self.keep_alive_s <= MAX_RETRY_AFTER_S:
            raise InvalidArgumentError(f"keep_alive_s={self.keep_alive_s}", accepted=f"more than {MAX_RETRY_AFTER_S}"
                                       " s (the longest Retry-After sent): a client honouring Retry-After must not "
                                       "find its pooled connection closed", fix="--keep-alive 75")


class ImageService:
    """A pipeline, its batching engine and metrics: loaded in the background, ready after a warm-up."""

    def __init__(self, settings: ServeSettings, pipeline=None):
        self.settings, self.pipeline = settings, pipeline
        self.metrics = ServiceMetrics()
        self.engine: BatchingEngine | None = None
        self.limits = Limits(default_size=settings.default_size, default_steps=settings.default_steps,
                             max_n=settings.max_n)
        self.load_error: str | None = None  # fatal: liveness fails, generations 503 without Retry-After
        self.draining = False
        self.recent_latency_s = 5.0  # moving average of answered requests (for Retry-After)
        self._ready = threading.Event()
        adapters = {}
        if settings.loras:  # a bad adapter fails here, at start (without adapters, loading errors go to the probes)
            manifest = pipeline.manifest if pipeline is not None else Manifest.load(settings.artifacts)
            adapters = register_adapters(manifest, settings.loras)
        self.adapters = AdapterStates(adapters, settings.lora_cache, self._adapter_engine, self.metrics)

    def _adapter_engine(self, choices) -> tuple:
        """A pipeline with these adapters and its own engine (one weight state per backend): (engine, bytes)."""
        s = self.settings
        precision = s.precision or ("default" if s.backend == "trt" else "fp32")
        pipe = Pipeline.from_artifacts(self.pipeline.manifest, s.backend, precision, scheduler=s.scheduler,
                                       **dict(s.backend_options))
        weight_bytes = pipe.set_lora(choices)
        config = EngineConfig(max_batch=s.max_batch, max_queue=s.max_queue)
        return BatchingEngine(pipe, config, self.metrics).start(), weight_bytes

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and self.engine.accepting

    def load(self) -> None:
        """Open the artifacts, start the engine, warm up at the smallest size; errors are kept for the probes."""
        try:
            s = self.settings
            if self.pipeline is None:
                precision = s.precision or ("default" if s.backend == "trt" else "fp32")
                self.pipeline = Pipeline.from_artifacts(s.artifacts, s.backend, precision, scheduler=s.scheduler,
                                                        **dict(s.backend_options))
            self.limits = limits_for(self.pipeline.backend.record("unet").axes, self.limits)
            self._describe_build()
            config = EngineConfig(max_batch=s.max_batch, max_queue=s.max_queue)
            self.engine = BatchingEngine(self.pipeline, config, self.metrics).start()
            if s.warmup:
                side = self.limits.min_side
                self.engine.generate("warm-up", steps=1, height=side, width=side, timeout_s=s.timeout_s)
            self._ready.set()
            log.warning("k3trt serve: ready (%s, max batch %d)", s.artifacts, s.max_batch)
        except Exception as exc:  # noqa: BLE001 - kept and shown by the probes; liveness fails so it is restarted
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("k3trt serve: loading failed: %s", self.load_error)

    def _describe_build(self) -> None:

        manifest = self.pipeline.manifest
        try:
            version = metadata.version("kandinsky3-trt")
        except metadata.PackageNotFoundError:
            version = "unknown"
        backend = self.pipeline.backend
        names = ("text_encoder", "unet", "movq_decoder")
        precisions = ",".join(f"{n}={backend.resolve(n).variant}" for n in names if _has(backend, n))
        digest = hashlib.sha256((manifest.root / MANIFEST_NAME).read_bytes()).hexdigest()[:16]
        self.metrics.describe_build(version, self.pipeline.backend.name, precisions, digest)  # what auto chose

    def begin_drain(self) -> None:
        """Stop admitting (readiness 503, new requests 503 + Retry-After); running and queued work goes on."""
        self.draining = True
        self._ready.clear()

    def abort(self) -> None:
        """Past the grace: cancel whatever still runs; each waiting client gets the JSON 503."""
        self.draining = True
        self._ready.clear()
        if self.engine is not None:
            self.engine.stop(0.0)
        self.adapters.stop(0.0)

    def shutdown(self) -> None:
        self._ready.clear()
        if self.engine is not None:
            self.engine.stop(self.settings.grace_s)
        self.adapters.stop(self.settings.grace_s)

    def retry_after(self) -> str:
        """Seconds until a queue slot is likely free: the recent mean request latency, 1..MAX_RETRY_AFTER_S."""
        return str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.recent_latency_s))))


def _has(backend, component: str) -> bool:
    try:
        backend.resolve(component)
        return True
    except K3TRTError:
        return False


def limits_for(unet_axes: dict, limits: Limits) -> Limits:
    """The image sides the U-Net's latent range allows (multiples of 64), and the defaults checked against them."""
    lo, hi = unet_axes.get("height", (8, 256))
    limits = dataclasses.replace(limits, min_side=max(64, -(-lo * 8 // 64) * 64), max_side=hi * 8 // 64 * 64)
    check_defaults(limits)
    return limits


def check_defaults(limits: Limits) -> None:
    """The server's defaults must be requests it accepts (else every default request would be refused as the
    client's fault): raised at start-up, naming the option."""
    if not 1 <= limits.default_steps <= limits.max_steps:
        raise InvalidArgumentError(f"--default-steps {limits.default_steps}", accepted=f"1..{limits.max_steps} "
                                   "(what a request may ask for)", fix="--default-steps 25")
    try:
        _size(limits.default_size, limits)
    except FieldError as exc:
        raise InvalidArgumentError(f"--default-resolution {limits.default_size}", accepted=exc.accepted,
                                   fix=f"--default-resolution {limits.min_side}x{limits.min_side}") from None


def create_app(service: ImageService, *, load_in_background: bool = True):
    """The FastAPI application around `service` (which it loads at start-up unless already loaded)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if service.engine is None and service.load_error is None:
            if load_in_background:  # /healthz answers while the models load
                threading.Thread(target=service.load, name="k3trt-load", daemon=True).start()
            else:
                await asyncio.to_thread(service.load)
        yield
        app.state.jobs.cancel_all()
        await asyncio.to_thread(service.shutdown)

    # docs_url/redoc_url off: FastAPI's pages load their scripts from a CDN (blank offline); /openapi.json stays
    app = FastAPI(title="k3trt", summary="Kandinsky 3 images (OpenAI Images API shape)", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.jobs = JobStore(service.settings.max_jobs, service.settings.job_ttl_s,
                              on_change=lambda counts: [service.metrics.jobs.labels(k).set(v)
                                                        for k, v in counts.items()])
    _add_probes(app, service)
    images = ImageRoutes(service)
    app.add_api_route("/v1/images/generations", images.generations, methods=["POST"],
                      openapi_extra=describe_routes["generations"], response_model=None)
    app.add_api_route("/v1/images/edits", images.edits, methods=["POST"], openapi_extra=describe_routes["edits"],
                      response_model=None)
    app.add_api_route("/v1/images/variations", images.variations, methods=["POST"], response_model=None,
                      openapi_extra=describe_routes["variations"])
    add_job_routes(app, images)
    add_animation_routes(app, images, read_body)
    app.add_middleware(RequestMiddleware, metrics=service.metrics, api_key=service.settings.api_key)
    if service.settings.cors_allow_origins:  # outermost: a preflight is answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(service.settings.cors_allow_origins),
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["authorization", "content-type", "x-request-id"],
                           expose_headers=["x-request-id", "retry-after", IGNORED_HEADER.lower()])
    return app


def _add_probes(app, service: ImageService) -> None:
    @app.get("/healthz", summary="liveness: 503 once loading failed for good (restart the process)")
    async def healthz():
        if service.load_error:
            return JSONResponse({"status": "failed", "error": service.load_error}, status_code=503)
        return {"status": "alive"}

    @app.get("/readyz", summary="readiness: 200 when loaded and warmed up, 503 while loading or draining")
    async def readyz(request: Request):
        if service.ready:
            return {"status": "ready"}
        reason = service.load_error or ("draining (shutting down)" if service.draining else "loading")
        return JSONResponse(error_payload(503, f"not ready: {reason}", "unavailable", "not_ready", request.scope),
                            status_code=503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", summary="the base model and one model per LoRA adapter (OpenAI's model list)")
    async def models():
        return {"object": "list", "data": [_model_card(service, m) for m in service.adapters.model_ids]}

    @app.get("/v1/models/{model_id}", summary="one model (OpenAI's model object)")
    async def model(model_id: str, request: Request):
        accepted = service.adapters.model_ids
        if model_id not in accepted:
            return JSONResponse(error_payload(404, f"model {model_id!r} is not served here (accepted: "
                                              f"{', '.join(accepted)})", "invalid_request_error", "model_not_found",
                                              request.scope, "model"), status_code=404)
        return _model_card(service, model_id)


def _model_card(service: ImageService, model_id: str = MODEL_ID) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "k3trt",
            "backend": service.settings.backend, "artifacts": os.path.basename(service.settings.artifacts)}


class ImageRoutes:
    """The two image routes, their shared parsing/admission, and the error answers (also used by the job API)."""

    def __init__(self, service: ImageService):
        self.service = service

    async def generations(self, request: Request):
        return await self._serve(request, "generations")

    async def edits(self, request: Request):
        """Image to image, or inpainting with `mask`, or outpainting with `outpaint`: schema.to_edit."""
        return await self._serve(request, "edits")

    async def variations(self, request: Request):
        """OpenAI's create_variation as image to image; this model needs a `prompt` (the SDK: extra_body)."""
        return await self._serve(request, "variations")

    async def _serve(self, request: Request, route: str):
        started = time.monotonic()
        work = await self.admit(request, route)
        if isinstance(work, Response):
            return work
        if work.options.stream:
            return StreamingResponse(event_stream(work, route, self.fail_body), media_type="text/event-stream",
                                     headers=self.headers(work))
        return await self.answer(request, work, started)

    async def admit(self, request: Request, route: str):
        """Parse (bad input 400/408/413 first), then readiness (503), then queue: the ImageWork or a refusal."""
        service = self.service
        try:
            job_request, task, options, model = await self.parse(request, route)
            adapter = service.adapters.resolve(model)
        except K3TRTError as exc:
            return self.fail(request, exc)
        if service.load_error or not service.ready:
            return self.fail(request, _not_ready(service))

        def queue(engine):
            return engine, ImageWork.queue(engine, job_request, timeout_s=service.settings.timeout_s,
                                           task_inputs=task)
        try:  # an adapter runs on its own pipeline + engine (adapters.py), built on first use off the event loop
            engine, jobs = queue(service.engine) if adapter is None else \
                await asyncio.to_thread(service.adapters.submit, adapter, queue)
            work = ImageWork(engine, jobs, options, "generate" if task is None else task.kind)
        except K3TRTError as exc:
            return self.fail(request, exc, param="image" if task is not None else "size")
        note(request.scope, task=work.task, images=len(work.jobs))
        return work

    async def parse(self, request: Request, route: str):
        content_type = request.headers.get("content-type", "")
        with_images = route in ("edits", "variations")
        limit = MAX_EDIT_BODY_BYTES if with_images else MAX_BODY_BYTES
        raw = await read_body(request, limit, self.service.settings.body_timeout_s)
        if with_images and is_multipart(content_type):
            body = await parse_form(raw, request.headers)
        else:
            body = await asyncio.to_thread(parse_body, raw, limit) if with_images else parse_body(raw, limit)
        options = output_options(body)
        model = body.get("model")
        if route == "variations":
            check_variation(body)
        if with_images:  # decodes the images, off the event loop
            job_request, task = await asyncio.to_thread(to_edit, body, self.service.limits)
            return job_request, task, options, model
        return to_request(body, self.service.limits), None, options, model

    async def answer(self, request: Request, work: ImageWork, started: float):
        waiting = asyncio.ensure_future(work.result())
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if not waiting.done() and await request.is_disconnected():
                    work.cancel()  # takes effect at the next step boundary
                    waiting.cancel()
                    log.info("request %s: the client disconnected; cancelled", request.scope["state"]["request_id"])
                    return Response(status_code=499)
        except asyncio.CancelledError:  # the server gave up on this request
            work.cancel()
            waiting.cancel()
            raise
        note(request.scope, queue_wait=work.queue_wait())
        try:
            images = waiting.result()
        except K3TRTError as exc:
            return self.fail(request, exc)
        items = await work.items(images)
        self.service.metrics.images.labels(work.task).inc(len(items))
        if work.queue_wait() is not None:
            self.service.metrics.queue_wait.labels(work.task).observe(work.queue_wait())
        elapsed = time.monotonic() - started
        self.service.recent_latency_s = 0.8 * self.service.recent_latency_s + 0.2 * elapsed
        return JSONResponse(work.body(items), headers=self.headers(work))

    def headers(self, work: ImageWork) -> dict:
        headers = {"x-k3trt-replica": REPLICA}
        ignored = list(work.options.ignored) + (["partial_images"] if work.options.partial_images else [])
        if ignored:
            headers[IGNORED_HEADER] = ",".join(ignored)
        return headers

    def fail_body(self, exc: BaseException, scope) -> tuple[int, dict, dict]:
        """(status, OpenAI error body, headers) for a typed error."""
        service = self.service
        answer = answer_for(exc, failed=bool(service.load_error))
        if isinstance(exc, K3TRTError) and answer.status >= 500 and answer.code == "internal_error":
            log.error("request %s failed: %s", scope.get("state", {}).get("request_id"), exc)
        code = "shutting_down" if answer.code == "cancelled" and service.draining else answer.code
        headers = {"Retry-After": service.retry_after() if answer.status == 429 else "5"} if answer.retry else {}
        return answer.status, error_payload(answer.status, str(exc), answer.kind, code, scope,
                                            getattr(exc, "param", None)), headers

    def fail(self, request: Request, exc: BaseException, param: str | None = None):
        status, body, headers = self.fail_body(exc, request.scope)
        if param and body["error"]["param"] is None and status == 400:
            body["error"]["param"] = param
        return JSONResponse(body, status_code=status, headers=headers)


def check_variation(body: dict) -> None:
    """A variation is image to image: no mask or outpaint; the prompt this model needs is named in the fix."""
    for name in ("mask", "outpaint"):
        if body.get(name) is not None:
            raise FieldError(name, f"{name} on /v1/images/variations", accepted="image, prompt, n, size, strength, "
                             "seed, steps", fix="send masks and margins to /v1/images/edits",
                             code="unknown_parameter")
    if body.get("prompt") is None:
        raise FieldError("prompt", "prompt is missing (Kandinsky 3 draws a variation from a text prompt)",
                         accepted="a string (empty is allowed, as for generations)", fix='send it with the SDK as extra_body={"prompt": "..."}',
                         code="missing_required_parameter")


def _not_ready(service: ImageService) -> NotAcceptingError:
    reason = ("failed to load: " + service.load_error if service.load_error else
              "shutting down" if service.draining else "still loading")
    return NotAcceptingError(f"the service is not ready ({reason})",
                             fix="restart the server and check its log" if service.load_error
                             else "retry after Retry-After seconds (or on another replica)")


async def read_body(request, limit: int = MAX_BODY_BYTES, timeout_s: float | None = None) -> bytes:
    """The body, read no further than one chunk past `limit` (a huge body is refused, not buffered), within
    `timeout_s` (a client that stalls mid-body gets 408 and its connection back; nothing waits forever)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared, limit)
    try:
        return await asyncio.wait_for(_read_capped(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise BodyError(f"the request body did not arrive within {timeout_s:g} s", status=408,
                        accepted=f"a complete body within {timeout_s:g} s (--body-timeout)",
                        fix="send the whole body at once, or raise --body-timeout", code="body_timeout") from None


async def _read_capped(request, limit: int = MAX_BODY_BYTES) -> bytes:
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
