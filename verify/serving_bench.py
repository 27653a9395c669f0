"""Batching benchmark: images/s and p50/p95 latency at several concurrencies, batching off and on, one run.

A benchmark, not a timed test. Closed-loop clients (each sends its next request when the previous one returns)
drive one engine in-process; for every concurrency the unbatched and the batched engine run back to back on the
same requests, so load changes on the machine hit both alike. Both engines share one pipeline (one set of
sessions), and both are warmed up first.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from k3trt.runtime.pipeline import Pipeline, make_request
from k3trt.runtime.serving.engine import BatchingEngine, EngineConfig, EngineObserver

PROMPTS = ("a red fox in a snowy forest, watercolor", "a lighthouse on a cliff at dusk", "a bowl of ramen",
           "a cat sitting on a window sill in the moonlight", "a sailing ship in a storm, oil painting",
           "a city street in the rain at night", "a mountain lake at sunrise", "a robot reading a book")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def closed_loop(send: Callable[[int], int], clients: int, per_client: int) -> dict:
    """`clients` threads each call `send(i)` (returns images made) `per_client` times; throughput and latency."""
    latencies: list[float] = []
    images = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            start = time.perf_counter()
            made = send(c * per_client + k)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                images[0] += made

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"images_per_s": images[0] / wall, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95), "requests": len(latencies), "wall_s": wall}


class CallCounter(EngineObserver):
    """U-Net calls and the images they carried (how full the shared calls were)."""

    def __init__(self):
        self.calls = self.images = 0

    def unet_call(self, images: int, requests: int) -> None:
        self.calls += 1
        self.images += images

    def take(self) -> float:
        mean = self.images / self.calls if self.calls else 0.0
        self.calls = self.images = 0
        return mean


def bench_serving(pipeline: Pipeline, *, concurrency: Sequence[int] = (1, 2, 4, 8), per_client: int = 2,
                  max_batch: int = 8, steps: int = 4, height: int = 64, width: int = 64, log=print) -> dict:
    def request(i: int):
        return make_request(PROMPTS[i % len(PROMPTS)], seed=i, steps=steps, height=height, width=width)

    counters = {"off": CallCounter(), "on": CallCounter()}
    engines = {name: BatchingEngine(pipeline, EngineConfig(max_batch=max_batch, max_queue=max(concurrency) + 1,
                                                           batching=name == "on"), counters[name]).start()
               for name in ("off", "on")}
    lengths = sorted({pipeline.encode(request(i)).length for i in range(len(PROMPTS))})
    try:
        for name, engine in engines.items():  # warm-up: sessions, allocations, the batch shapes
            closed_loop(lambda i, e=engine: len(e.submit(request(i)).result()), min(4, max_batch), 1)
            counters[name].take()
        rows = []
        for clients in concurrency:
            row = {"concurrency": clients}
            for name, engine in engines.items():
                log(f"concurrency {clients}, batching {name}: {clients * per_client} requests ...")
                row[name] = closed_loop(lambda i, e=engine: len(e.submit(request(i)).result()), clients,
                                        per_client)
                row[name]["images_per_unet_call"] = counters[name].take()
            row["speedup"] = row["on"]["images_per_s"] / row["off"]["images_per_s"]
            rows.append(row)
    finally:
        for engine in engines.values():
            engine.stop(grace_s=0)
    return {"rows": rows, "max_batch": max_batch, "steps": steps, "size": f"{width}x{height}",
            "per_client": per_client, "context_lengths": lengths}


def format_serving(result: dict) -> str:
    head = (f"{'clients':>7} | {'off img/s':>9} {'p50 s':>7} {'p95 s':>7} | {'on img/s':>9} {'p50 s':>7} "
            f"{'p95 s':>7} {'img/call':>8} | {'on/off':>6}")
    lines = [f"step-level batching, {result['size']}, {result['steps']} steps, max batch {result['max_batch']}, "
             f"{result['per_client']} requests per client, prompt context lengths {result['context_lengths']}",
             head, "-" * len(head)]
    for row in result["rows"]:
        off, on = row["off"], row["on"]
        lines.append(f"{row['concurrency']:>7} | {off['images_per_s']:9.2f} {off['p50_s']:7.2f} {off['p95_s']:7.2f}"
                     f" | {on['images_per_s']:9.2f} {on['p50_s']:7.2f} {on['p95_s']:7.2f} "
                     f"{on['images_per_unet_call']:8.2f} | "
                     f"{row['speedup']:5.2f}x")
    return "\n".join(lines)
