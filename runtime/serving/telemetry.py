"""Prometheus metrics of the service (prometheus-client), fed by the HTTP layer and the engine's observer hooks.

One registry per service (tests run several in a process); the process collector adds the server's RSS
(`process_resident_memory_bytes`), which the load test reads before and after.
"""
from __future__ import annotations

from k3trt.runtime.serving.engine import EngineObserver

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class ServiceMetrics(EngineObserver):
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("k3trt_requests", "HTTP image requests by status code", ["status"], registry=r)
        self.latency = Histogram("k3trt_request_seconds", "time from arrival to answer of image requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("k3trt_queue_wait_seconds", "time a request waited before admission",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.depth = Gauge("k3trt_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("k3trt_active_requests", "requests in the denoising batch", registry=r)
        self.batch = Histogram("k3trt_unet_batch_images", "images per U-Net call",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.stages = Histogram("k3trt_stage_seconds", "seconds per component call", ["stage"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("k3trt_images", "images returned", registry=r)

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
