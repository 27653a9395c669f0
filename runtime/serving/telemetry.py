"""Prometheus metrics of the service (prometheus-client), fed by the HTTP layer and the engine's observer hooks.

One registry per service (tests run several in a process); the process collector adds the server's RSS
(`process_resident_memory_bytes`), which the load test reads before and after. Every answered API request is
counted and timed with its `route` and `status` (refusals and failures too, not only successes); queue waits
carry the `task`. `k3trt_build_info` names what is served. The `_created` series are switched off
(`disable_created_metrics`): they double the series count and Prometheus does not need them.
Under Ray Serve each replica keeps its own registry: docs/serving.md says how to scrape each replica.
"""
from __future__ import annotations

from k3trt.runtime.serving.engine import EngineObserver

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models",
          "/v1/jobs")  # the label values; any other path is "other"


def route_label(path: str) -> str:
    """A bounded label for a request path (job ids and unknown paths must not create series)."""
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


class ServiceMetrics(EngineObserver):
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        from prometheus_client import disable_created_metrics

        disable_created_metrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("k3trt_requests", "API requests by route and HTTP status (499: the client left)",
                                ["route", "status"], registry=r)
        self.latency = Histogram("k3trt_request_seconds", "time from arrival to answer of API requests, every outcome",
                                 ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("k3trt_queue_wait_seconds", "time a request waited before admission",
                                    ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.depth = Gauge("k3trt_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("k3trt_active_requests", "requests in the denoising batch", registry=r)
        self.batch = Histogram("k3trt_unet_batch_images", "images per U-Net call",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.stages = Histogram("k3trt_stage_seconds", "seconds per component call", ["stage"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("k3trt_images", "images returned", ["task"], registry=r)
        self.build_info = Gauge("k3trt_build_info", "what this process serves (value 1)",
                                ["version", "backend", "precisions", "artifact_hash"], registry=r)
        self.jobs = Gauge("k3trt_jobs", "asynchronous jobs held, by status", ["status"], registry=r)
        self.lora_cache_bytes = Gauge("k3trt_lora_cache_bytes", "bytes of LoRA-overridden weights held by the "
                                      "cached adapter pipelines (--lora-cache)", registry=r)
        self.lora_cache_states = Gauge("k3trt_lora_cache_states", "adapter pipelines cached", registry=r)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route, str(status)).observe(seconds)

    def describe_build(self, version: str, backend: str, precisions: str, artifact_hash: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version, backend, precisions, artifact_hash).set(1)

    # engine hooks (called from the worker thread; prometheus-client is thread-safe)
    def stage(self, stage: str, seconds: float) -> None:
        self.stages.labels(stage).observe(seconds)

    def unet_call(self, images: int, requests: int) -> None:
        self.batch.observe(images)

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)

    def active(self, count: int) -> None:
        self.running.set(count)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
