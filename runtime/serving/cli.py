"""`k3trt serve | bench-serve | loadtest`: the HTTP service, the batching benchmark and the load test."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import BackendUnavailableError, InvalidArgumentError


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            import argparse

            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value
    return parse


def add_engine_args(p) -> None:
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--backend", choices=["ort", "trt"], default="ort",
                   help="ort: ONNX Runtime; trt: TensorRT engines from `k3trt build`")
    p.add_argument("--precision", default=None, help="as for `k3trt generate` (ort: fp32|int8; trt: engines')")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--threads", type=_positive(int), default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-batch", type=_positive(int), default=4, help="images per shared U-Net call")


def backend_options(args) -> tuple:
    return (("provider", args.provider), ("threads", args.threads)) if args.backend == "ort" else ()


def serve_settings(args):
    from .http import ServeSettings
    from .schema import SIZE_PATTERN

    if not SIZE_PATTERN.match(args.default_size):
        raise InvalidArgumentError(f"--default-size {args.default_size!r}", accepted="WxH, e.g. 1024x1024")
    return ServeSettings(artifacts=args.artifacts, backend=args.backend, precision=args.precision,
                         backend_options=backend_options(args), max_batch=args.max_batch, max_queue=args.max_queue,
                         timeout_s=args.timeout, default_size=args.default_size, default_steps=args.default_steps,
                         grace_s=args.grace)


def require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise BackendUnavailableError(f"the HTTP service needs {exc.name}, which is not installed",
                                      fix="pip install 'kandinsky3-trt[serve]'") from None


def cmd_serve(args) -> int:
    from ..artifacts import Manifest

    require_serve_extra()
    Manifest.load(args.artifacts)  # a typed error now, not a failed background load
    settings = serve_settings(args)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(settings, host=args.host, port=args.port, replicas=args.replicas,
                       max_replicas=args.max_replicas)
    return run_uvicorn(settings, args.host, args.port)


def run_uvicorn(settings, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT: stop admitting at once (/readyz 503), let running requests finish for up to
    `settings.grace_s`, cancel the rest, exit 0."""
    import signal

    import uvicorn

    from .http import ImageService, create_app

    service = ImageService(settings)
    app = create_app(service)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.stop_admitting()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(settings.grace_s) or None)
    # uvicorn re-raises the signal after a graceful shutdown; with a no-op handler here it ends as exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log(f"k3trt serve: http://{host}:{port} (loading {settings.artifacts}; /readyz turns 200 when warmed up)")
    Server(config).run()
    log("k3trt serve: stopped")
    return 0


def cmd_bench_serve(args) -> int:
    from ..commands import resolve_size

    resolve_size(args, 64)
    from ..pipeline import Pipeline
    from .bench import bench_serving, format_serving

    options = dict(backend_options(args))
    pipe = Pipeline.from_artifacts(args.artifacts, args.backend, args.precision or
                                   ("default" if args.backend == "trt" else "fp32"), **options)
    result = bench_serving(pipe, concurrency=args.concurrency, per_client=args.requests_per_client,
                           max_batch=args.max_batch, steps=args.steps, height=args.height, width=args.width, log=log)
    print(format_serving(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_loadtest(args) -> int:
    from .loadtest import format_report, run_loadtest

    report = run_loadtest(args.url, requests=args.requests, concurrency=args.concurrency, warmup=args.warmup,
                          body={"prompt": args.prompt, "size": args.size, "steps": args.steps, "n": 1},
                          timeout_s=args.timeout, log=log)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def register(sub) -> None:
    from ..commands import add_size_args

    p = sub.add_parser("serve", help="HTTP image service (OpenAI Images API) with step-level batching")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-queue", type=_positive(int), default=32, help="waiting requests before 429")
    p.add_argument("--timeout", type=_positive(float), default=300.0, metavar="SECONDS", help="per-request deadline")
    p.add_argument("--default-size", default="1024x1024", metavar="WxH",
                   help="image size in pixels for requests that give none")
    p.add_argument("--default-steps", type=_positive(int), default=25, help="steps for requests that give none")
    p.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM: how long running requests may finish")
    p.add_argument("--ray", action="store_true", help="scale out with Ray Serve (one runtime per replica)")
    p.add_argument("--replicas", type=_positive(int), default=1, help="Ray Serve replicas (initial/min)")
    p.add_argument("--max-replicas", type=_positive(int), default=None,
                   help="Ray Serve autoscaling upper bound (default: fixed --replicas)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="batching benchmark: images/s and p50/p95 at concurrency 1,2,4,8, "
                                           "batching off vs on, in one run")
    add_engine_args(p)
    p.set_defaults(max_batch=8)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8],
                   help="comma list of concurrent clients to measure")
    p.add_argument("--requests-per-client", type=_positive(int), default=2, help="requests each client sends")
    p.add_argument("--steps", type=_positive(int), default=4, help="denoising steps per request")
    add_size_args(p, "default: 64x64")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("loadtest", help="drive a running `k3trt serve` on loopback; throughput, p50/p95/p99, "
                                        "status counts, server RSS before/after")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running `k3trt serve`")
    p.add_argument("--requests", type=_positive(int), default=500, help="requests to send in all")
    p.add_argument("--concurrency", type=_positive(int), default=8, help="requests in flight at once")
    p.add_argument("--warmup", type=int, default=20, help="requests before the RSS baseline")
    p.add_argument("--prompt", default="a red fox in a snowy forest, watercolor", help="the text of every request")
    p.add_argument("--size", default="64x64", help="image size in pixels, WxH (the OpenAI Images API's field)")
    p.add_argument("--steps", type=_positive(int), default=2, help="denoising steps per request")
    p.add_argument("--timeout", type=_positive(float), default=120.0, help="seconds before a request counts as failed")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_loadtest)
