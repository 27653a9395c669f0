"""Scale-out on Ray Serve: one runtime (pipeline + batching engine) per replica, the same HTTP API.

Each replica builds the FastAPI app of `http.create_app` at replica start (Ray's ASGI-builder ingress), loads the
artifacts and warms up before Ray routes to it; Ray's proxy spreads requests over the replicas, and Ray's
autoscaler adds or removes replicas between `min_replicas` and `max_replicas` on the number of ongoing requests.
On GPU machines each replica takes one GPU (`num_gpus=1`).

    k3trt serve --artifacts ART --ray --replicas 2                  # from the CLI
    k3trt serve --artifacts ART --ray --replicas 2 --replica-metrics-port 9400   # + one /metrics per replica
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


def replica_metrics_port(base: int, local_rank: int) -> int:
    """The port of one replica's own /metrics: `base` + its rank among the deployment's replicas on its node
    (so replicas on one host never collide, and each keeps its port across the others' restarts)."""
    return base + local_rank


def local_rank(context) -> int:
    """This replica's rank on its node, from Ray Serve's replica context (Ray >= 2.50 has ranks)."""
    rank = getattr(context, "rank", None)
    if rank is None:
        raise BackendUnavailableError("this Ray Serve has no replica ranks, which --replica-metrics-port needs",
                                      accepted="ray[serve] with ReplicaContext.rank", fix="pip install -U 'ray[serve]'")
    return int(getattr(rank, "local_rank", rank))


def serve_replica_metrics(registry, base: int, host: str = "127.0.0.1") -> int:
    """Serve this replica's k3trt registry on its own port (prometheus-client's exporter thread); returns it.
    Ray's proxy sends each `/metrics` request to one replica, so a scrape of the shared port sees whichever
    answered, and Prometheus reads the jumps between replicas as counter resets; one target per replica
    keeps each replica's counters monotonic."""
    from prometheus_client import start_http_server
    from ray import serve

    port = replica_metrics_port(base, local_rank(serve.get_replica_context()))
    start_http_server(port, addr=host, registry=registry)
    return port


def build_application(settings: ServeSettings, *, replicas: int = 1, max_replicas: int | None = None,
                      cpus_per_replica: float = 1.0, metrics_port: int | None = None, metrics_host: str = "127.0.0.1"):
    """The Ray Serve Application (deployment bound), ready for `serve.run`. `metrics_port`: each replica also
    serves its own metrics at `metrics_port` + its rank on the node (see `serve_replica_metrics`)."""
    _, serve = require_ray()

    def build_asgi_app():  # runs in each replica process
        from k3trt.runtime.serving.http import ImageService, create_app

        service = ImageService(settings)
        if metrics_port is not None:
            serve_replica_metrics(service.metrics.registry, metrics_port, metrics_host)
        return create_app(service, load_in_background=False)

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
    metrics_port = int(args.pop("replica_metrics_port")) if "replica_metrics_port" in args else None
    threads = int(args.pop("threads", 0)) or None
    fields = {f.name: f.type for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise InvalidArgumentError(f"unknown serve run argument(s) {unknown}", accepted=", ".join(sorted(fields)))
    typed = {k: _convert(v, fields[k]) for k, v in args.items()}
    settings = ServeSettings(**typed, backend_options=(("threads", threads),) if threads else ())
    return build_application(settings, replicas=replicas, max_replicas=max_replicas, metrics_port=metrics_port)


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


def run_ray(settings: ServeSettings, *, host: str, port: int, replicas: int, max_replicas: int | None,
            metrics_port: int | None = None) -> int:
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
        serve.run(build_application(settings, replicas=replicas, max_replicas=max_replicas,
                                    metrics_port=metrics_port, metrics_host=host), name="k3trt", route_prefix="/")
        scale = f"{replicas} replica(s)" if max_replicas in (None, replicas) else f"{replicas}..{max_replicas} replicas"
        print(f"k3trt serve (Ray Serve, {scale}): http://{host}:{port}", file=sys.stderr, flush=True)
        if metrics_port is not None:
            last = metrics_port + (max_replicas or replicas) - 1
            print(f"k3trt serve: each replica's metrics at http://{host}:{metrics_port}..{last}/metrics "
                  "(one port per replica on this node)", file=sys.stderr, flush=True)
        stop.wait()
        print("k3trt serve: stopping Ray Serve (replicas finish running requests)", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
