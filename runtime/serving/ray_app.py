"""Scale-out on Ray Serve: one runtime (pipeline + batching engine) per replica, the same HTTP API.

Each replica builds the FastAPI app of `http.create_app` at replica start (Ray's ASGI-builder ingress), loads the
artifacts and warms up before Ray routes to it; Ray's proxy spreads requests over the replicas, and Ray's
autoscaler adds or removes replicas between `min_replicas` and `max_replicas` on the number of ongoing requests.
On GPU machines each replica takes one GPU (`num_gpus=1`).

    k3trt serve --artifacts ART --ray --replicas 2                  # from the CLI
    serve run k3trt.runtime.serving.ray_app:app_builder artifacts=ART replicas=2 max_replicas=4   # Ray's CLI
"""
from __future__ import annotations

import dataclasses
import os
import sys

from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError
from k3trt.runtime.serving.http import ServeSettings


def require_ray():
    try:
        import ray
        from ray import serve
    except ModuleNotFoundError:
        raise BackendUnavailableError("Ray Serve is not installed", fix="pip install 'kandinsky3-trt[ray]'") from None
    return ray, serve


def uses_gpu(settings: ServeSettings) -> bool:
    return settings.backend == "trt" or dict(settings.backend_options).get("provider", "cpu") != "cpu"


def deployment_options(settings: ServeSettings, replicas: int, max_replicas: int | None,
                       cpus_per_replica: float = 1.0) -> dict:
    """Ray Serve deployment options: fixed replicas, or autoscaling between `replicas` and `max_replicas`."""
    if max_replicas is not None and max_replicas < replicas:
        raise InvalidArgumentError(f"--max-replicas {max_replicas} < --replicas {replicas}",
                                   accepted="max_replicas >= replicas", fix=f"--max-replicas {replicas}")
    actor = {"num_cpus": cpus_per_replica, "num_gpus": 1 if uses_gpu(settings) else 0}
    # a replica holds at most max_batch running + max_queue waiting requests; beyond that Ray queues
    options = {"name": "k3trt", "ray_actor_options": actor,
               "max_ongoing_requests": settings.max_batch + settings.max_queue,
               "health_check_period_s": 10, "graceful_shutdown_timeout_s": settings.grace_s}
    if max_replicas is None or max_replicas == replicas:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": settings.max_batch}
    return options


def build_application(settings: ServeSettings, *, replicas: int = 1, max_replicas: int | None = None,
                      cpus_per_replica: float = 1.0):
    """The Ray Serve Application (deployment bound), ready for `serve.run`."""
    _, serve = require_ray()

    def build_asgi_app():  # runs in each replica process
        from k3trt.runtime.serving.http import ImageService, create_app

        return create_app(ImageService(settings), load_in_background=False)

    class K3TRTReplica:
        """One runtime per replica; the ASGI app above serves its HTTP routes."""

    ingress = serve.ingress(build_asgi_app)(K3TRTReplica)
    options = deployment_options(settings, replicas, max_replicas, cpus_per_replica)
    return serve.deployment(ingress, **options).bind()


def app_builder(args: dict):
    """For `serve run k3trt.runtime.serving.ray_app:app_builder artifacts=ART [replicas=N] [max_replicas=M]
    [max_batch=4] [backend=ort] [threads=1] [default_size=1024x1024]`."""
    args = dict(args)
    if "artifacts" not in args:
        raise InvalidArgumentError("serve run needs artifacts=ART", fix="serve run ...:app_builder artifacts=/path")
    replicas = int(args.pop("replicas", 1))
    max_replicas = int(args.pop("max_replicas")) if "max_replicas" in args else None
    threads = int(args.pop("threads", 0)) or None
    fields = {f.name: f.type for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise InvalidArgumentError(f"unknown serve run argument(s) {unknown}", accepted=", ".join(sorted(fields)))
    typed = {k: _convert(v, fields[k]) for k, v in args.items()}
    settings = ServeSettings(**typed, backend_options=(("threads", threads),) if threads else ())
    return build_application(settings, replicas=replicas, max_replicas=max_replicas)


def _convert(value, annotation: str):
    kind = str(annotation)
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("bool"):
        return str(value).lower() in ("1", "true", "yes")
    if kind.startswith("tuple"):  # cors_allow_origins=a,b
        return tuple(item.strip() for item in str(value).split(",") if item.strip())
    return value


def run_ray(settings: ServeSettings, *, host: str, port: int, replicas: int, max_replicas: int | None) -> int:
    """Start a local Ray (or join RAY_ADDRESS), deploy, and serve until SIGTERM/SIGINT; exit 0."""
    import signal
    import threading

    ray, serve = require_ray()
    stop = threading.Event()
    cpus = None if os.environ.get("RAY_ADDRESS") else max(replicas if max_replicas is None else max_replicas,
                                                          os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own (aborting) handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(settings, replicas=replicas, max_replicas=max_replicas), name="k3trt",
                  route_prefix="/")
        scale = f"{replicas} replica(s)" if max_replicas in (None, replicas) else f"{replicas}..{max_replicas} replicas"
        print(f"k3trt serve (Ray Serve, {scale}): http://{host}:{port}", file=sys.stderr, flush=True)
        stop.wait()
        print("k3trt serve: stopping Ray Serve (replicas finish running requests)", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
