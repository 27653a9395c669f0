"""`k3trt serve | bench-serve | loadtest`: the HTTP service, the batching benchmark and the load test."""
from __future__ import annotations

import sys
from pathlib import Path

from k3trt.cli.arguments import add_min_psnr_arg, add_renamed, add_size_args, resolve_size
from k3trt.contract.arguments import (
    MAX_REPEATS,
    MAX_STEPS,
    available_cores,
    check_float,
    check_int,
    check_text,
    check_threads,
    parse_resolution,
)
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError
from k3trt.contract.limits import check_image_request
from k3trt.contract.manifest import Manifest
from k3trt.writing.ownership import check_output_json, save_json


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive(kind):
    def parse(text: str):
        import math

        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:  # float("nan") <= 0 is False: check finite
            import argparse

            raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite {kind.__name__}")
        return value
    return parse


def add_engine_args(p) -> None:
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--backend", choices=["auto", "ort", "openvino", "trt"], default="auto",
                   help="auto: the fastest fp32-exact backend installed (OpenVINO where present, else ONNX Runtime); "
                        "ort: ONNX Runtime; openvino: OpenVINO on the CPU; trt: TensorRT engines from `k3trt build`")
    p.add_argument("--precision", default=None, help="as for `k3trt generate` (auto: the fastest precision "
                   "`k3trt qualify` recorded at or above --min-psnr; ort: fp32|int8; trt: the engines'; "
                   "default: fp32 on the CPU backends, what `k3trt build` made for trt)")
    add_min_psnr_arg(p)
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None,
                   help=f"ONNX Runtime intra-op threads, 1..{available_cores()} (default: all cores)")
    p.add_argument("--max-batch", type=_positive(int), default=4, help="images per shared U-Net call")


def backend_options(args) -> tuple:
    common = (("min_psnr", args.min_psnr),)
    if args.backend in ("ort", "auto"):
        return (("provider", args.provider), ("threads", args.threads), *common)
    return ((("threads", args.threads),) if args.backend == "openvino" else ()) + common


API_KEY_ENV = "K3TRT_API_KEY"


def serve_settings(args, manifest=None):
    """The checked settings; with `manifest`, the defaults are checked against the sizes the artifacts allow."""
    import os

    from k3trt.runtime.serving.http import MAX_RETRY_AFTER_S, ServeSettings, check_defaults, limits_for
    from k3trt.runtime.serving.schema import SIZE_PATTERN, Limits

    check_threads(args.threads, "--threads")
    check_int("--port", args.port, 0, 65535, "e.g. --port 8000 (0: any free port)")
    if args.replica_metrics_port is not None:
        if not args.ray:
            raise InvalidArgumentError("--replica-metrics-port without --ray", accepted="--ray --replica-metrics-port "
                                       "PORT", fix="drop it: a single process serves its metrics at /metrics")
        last = args.replica_metrics_port + (args.max_replicas or args.replicas) - 1
        check_int("--replica-metrics-port", args.replica_metrics_port, 1024, 65535 - (last - args.replica_metrics_port),
                  "e.g. --replica-metrics-port 9400 (one port per replica from there)")
    for flag, value, hi in (("--grace", args.grace, 3600), ("--drain", args.drain, 3600),
                            ("--body-timeout", args.body_timeout, 3600), ("--job-ttl", args.job_ttl, 86_400)):
        check_float(flag, value, 0, hi, f"e.g. {flag} 30")
    check_float("--keep-alive", args.keep_alive, MAX_RETRY_AFTER_S + 1, 3600,
                f"e.g. --keep-alive 75 (longer than the longest Retry-After, {MAX_RETRY_AFTER_S} s)")
    if not SIZE_PATTERN.match(args.default_resolution):
        raise InvalidArgumentError(f"--default-resolution {args.default_resolution!r}",
                                   accepted="WxH in pixels, e.g. 1024x1024")
    limits = Limits(default_size=args.default_resolution, default_steps=args.default_steps)
    if manifest is not None:
        limits_for(manifest.onnx("unet").axes, limits)
    else:
        check_defaults(limits)
    from k3trt.runtime.serving.adapters import MAX_LORA_CACHE, parse_served_lora

    loras = tuple(parse_served_lora(text) for text in args.lora or ())
    check_int("--lora-cache", args.lora_cache, 1, MAX_LORA_CACHE, "e.g. --lora-cache 2")
    origins = tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip())
    return ServeSettings(artifacts=args.artifacts, backend=args.backend, precision=args.precision,
                         backend_options=backend_options(args), max_batch=args.max_batch, max_queue=args.max_queue,
                         timeout_s=args.timeout, default_size=args.default_resolution, default_steps=args.default_steps,
                         grace_s=args.grace, drain_s=args.drain, body_timeout_s=args.body_timeout,
                         keep_alive_s=args.keep_alive, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                         cors_allow_origins=origins, max_jobs=args.max_jobs, job_ttl_s=args.job_ttl,
                         loras=loras, lora_cache=args.lora_cache)


def require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise BackendUnavailableError(f"the HTTP service needs {exc.name}, which is not installed",
                                      fix="pip install 'kandinsky3-trt[serve]'") from None


def cmd_serve(args) -> int:
    require_serve_extra()
    manifest = Manifest.load(args.artifacts)  # a typed error now, not a failed background load
    settings = serve_settings(args, manifest)
    from k3trt.runtime.serving.middleware import configure_logging

    configure_logging(json_logs=args.json_logs)
    if args.ray:
        from k3trt.runtime.serving.adapters import register_adapters
        from k3trt.runtime.serving.ray_app import run_ray

        register_adapters(manifest, settings.loras)  # a bad adapter fails here, not in every replica

        return run_ray(settings, host=args.host, port=args.port, replicas=args.replicas,
                       max_replicas=args.max_replicas, metrics_port=args.replica_metrics_port)
    return run_uvicorn(settings, args.host, args.port)


ABORT_MARGIN_S = 10.0  # past the grace: time for the cancelled requests' JSON 503 to go out before uvicorn stops


def run_uvicorn(settings, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT, then drain: /readyz 503 and new requests 503 at once while the socket stays
    open for `settings.drain_s`; then the socket closes and running requests finish for up to `settings.grace_s`;
    past it the rest are cancelled and answered with the JSON 503. Exit 0 (a second signal: at once)."""
    import signal

    import uvicorn
    from k3trt.runtime.serving.http import ImageService, create_app

    service = ImageService(settings)
    app = create_app(service)

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            if self.draining:
                return super().handle_exit(sig, frame)
            self.draining = True
            service.begin_drain()
            log(f"k3trt serve: draining ({settings.drain_s:g} s, then up to {settings.grace_s:g} s for running "
                "requests)")
            _after(settings.drain_s, super().handle_exit, sig, frame)
            _after(settings.drain_s + settings.grace_s, service.abort)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                            timeout_keep_alive=int(settings.keep_alive_s),
                            timeout_graceful_shutdown=int(settings.grace_s + ABORT_MARGIN_S))
    # uvicorn re-raises the signal after a graceful shutdown; with a no-op handler here it ends as exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log(f"k3trt serve: http://{host}:{port} (loading {settings.artifacts}; /readyz turns 200 when warmed up)")
    Server(config).run()
    log("k3trt serve: stopped")
    return 0


def _after(seconds: float, fn, *args) -> None:
    import threading

    timer = threading.Timer(seconds, fn, args)
    timer.daemon = True
    timer.start()


MAX_CLIENTS = 256  # each client is a thread; more only measures the queue
MAX_REQUESTS = 1_000_000


def _clients(text: str) -> list[int]:
    """--concurrency "1,2,4,8": a comma list of client counts, each 1..MAX_CLIENTS."""
    import argparse

    items = [item.strip() for item in text.split(",")]
    if not items or not all(item.isdigit() and 1 <= int(item) <= MAX_CLIENTS for item in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of client counts in 1..{MAX_CLIENTS} "
                                         "(e.g. 1,2,4,8)")
    return [int(item) for item in items]


def check_bench_serve_args(args) -> None:
    """Output, threads, size and batch against the artifacts: before any session opens."""

    if args.json:
        check_output_json(args.json, "--json")
    check_threads(args.threads, "--threads")
    check_int("--requests-per-client", args.requests_per_client, 1, MAX_REPEATS)
    check_int("--steps", args.steps, 1, MAX_STEPS)
    manifest = Manifest.load(args.artifacts)
    resolve_size(args, 64)
    check_image_request(manifest, height=args.height, width=args.width, images=args.max_batch, guided=True)


def cmd_bench_serve(args) -> int:
    check_bench_serve_args(args)
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.serving_bench import bench_serving, format_serving

    options = dict(backend_options(args))
    pipe = Pipeline.from_artifacts(args.artifacts, args.backend, args.precision or
                                   ("default" if args.backend == "trt" else "fp32"), **options)
    result = bench_serving(pipe, concurrency=args.concurrency, per_client=args.requests_per_client,
                           max_batch=args.max_batch, steps=args.steps, height=args.height, width=args.width, log=log)
    print(format_serving(result))
    if args.json:
        save_json(result, Path(args.json))
    return 0


def check_loadtest_args(args) -> dict:
    """Output, URL (loopback only), request body and counts, before the first request; returns the body."""
    from k3trt.verify.loadtest import check_loopback

    if args.json:
        check_output_json(args.json, "--json")
    check_loopback(args.url)
    check_int("--requests", args.requests, 1, MAX_REQUESTS)
    check_int("--concurrency", args.concurrency, 1, MAX_CLIENTS)
    check_int("--warmup", args.warmup, 0, MAX_REQUESTS, "e.g. --warmup 20 (0: none)")
    check_float("--timeout", args.timeout, 0.001, 86_400)
    check_int("--steps", args.steps, 1, MAX_STEPS)
    width, height = parse_resolution(args.resolution)
    return {"prompt": check_text("--prompt", args.prompt), "size": f"{width}x{height}",
            "steps": args.steps, "n": 1}


def cmd_loadtest(args) -> int:
    body = check_loadtest_args(args)
    from k3trt.verify.loadtest import format_report, run_loadtest

    report = run_loadtest(args.url, requests=args.requests, concurrency=args.concurrency, warmup=args.warmup,
                          body=body, timeout_s=args.timeout, log=log)
    print(format_report(report))
    if args.json:
        save_json(report, Path(args.json))
    return 0 if report["ok"] else 1


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP image service (OpenAI Images API) with step-level batching")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-queue", type=_positive(int), default=32, help="waiting requests before 429")
    p.add_argument("--timeout", type=_positive(float), default=300.0, metavar="SECONDS", help="per-request deadline")
    p.add_argument("--default-resolution", default="1024x1024", metavar="WxH",
                   help="image size in pixels, width x height, for requests that give no \"size\"")
    add_renamed(p, "--default-size", "--default-resolution WxH")
    p.add_argument("--default-steps", type=_positive(int), default=25, help="steps for requests that give none")
    p.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM: how long running requests may finish (then they get a JSON 503)")
    p.add_argument("--drain", type=float, default=0.0, metavar="SECONDS", help="on SIGTERM: how long /readyz "
                   "answers 503 with the socket still open, so a load balancer stops sending (e.g. 5)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive within this (else 408)")
    p.add_argument("--keep-alive", type=float, default=75.0, metavar="SECONDS",
                   help="idle keep-alive connections; longer than any Retry-After (at most 30 s)")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (or set {API_KEY_ENV}); "
                   "/healthz, /readyz and /metrics stay open")
    p.add_argument("--cors-allow-origins", default=None, metavar="ORIGIN,...",
                   help="browser origins allowed to call the API (comma list, * for any)")
    p.add_argument("--json-logs", action="store_true", help="log one JSON object per line (access lines included)")
    p.add_argument("--max-jobs", type=_positive(int), default=64, help="asynchronous jobs held at once")
    p.add_argument("--job-ttl", type=float, default=600.0, metavar="SECONDS",
                   help="how long a finished job's result is kept")
    p.add_argument("--lora", action="append", metavar="NAME=PATH[:SCALE]", help="serve a LoRA adapter (PEFT folder "
                   "or .safetensors) as model \"kandinsky-3+NAME\" (repeatable; docs/finetunes.md)")
    p.add_argument("--lora-cache", type=int, default=2, metavar="N",
                   help="adapter pipelines held at once (least recently used idle one evicted)")
    p.add_argument("--ray", action="store_true", help="scale out with Ray Serve (one runtime per replica)")
    p.add_argument("--replicas", type=_positive(int), default=1, help="Ray Serve replicas (initial/min)")
    p.add_argument("--max-replicas", type=_positive(int), default=None,
                   help="Ray Serve autoscaling upper bound (default: fixed --replicas)")
    p.add_argument("--replica-metrics-port", type=int, default=None, metavar="PORT",
                   help="with --ray: each replica also serves its own /metrics at PORT + its rank on the node "
                        "(one Prometheus target per replica; the shared port answers from a random replica)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="batching benchmark: images/s and p50/p95 at concurrency 1,2,4,8, "
                                           "batching off vs on, in one run")
    add_engine_args(p)
    p.set_defaults(max_batch=8)
    p.add_argument("--concurrency", type=_clients, default="1,2,4,8", metavar="N,N,...",
                   help="comma list of concurrent clients to measure")
    p.add_argument("--requests-per-client", type=_positive(int), default=2, help="requests each client sends")
    p.add_argument("--steps", type=_positive(int), default=4, help="denoising steps per request")
    add_size_args(p, "default: 64x64")
    p.add_argument("--json", metavar="FILE.json", help="also write the results as JSON (a new file, or one k3trt "
                   "wrote)")
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("loadtest", help="drive a running `k3trt serve` on loopback; throughput, p50/p95/p99, "
                                        "status counts, server RSS before/after")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running `k3trt serve`")
    p.add_argument("--requests", type=_positive(int), default=500, help="requests to send in all")
    p.add_argument("--concurrency", type=_positive(int), default=8, help="requests in flight at once")
    p.add_argument("--warmup", type=int, default=20, help="requests before the RSS baseline (0: none)")
    p.add_argument("--prompt", default="a red fox in a snowy forest, watercolor", help="the text of every request")
    p.add_argument("--resolution", default="64x64", metavar="WxH",
                   help="image size in pixels, width x height (sent as the OpenAI Images API's \"size\")")
    add_renamed(p, "--size", "--resolution WxH")
    p.add_argument("--steps", type=_positive(int), default=2, help="denoising steps per request")
    p.add_argument("--timeout", type=_positive(float), default=120.0, help="seconds before a request counts as failed")
    p.add_argument("--json", metavar="FILE.json", help="also write the report as JSON (a new file, or one k3trt "
                   "wrote)")
    p.set_defaults(func=cmd_loadtest)
