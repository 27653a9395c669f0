"""Load test for `k3trt serve`, loopback only: N concurrent clients, a bounded number of requests.

Reports throughput, p50/p95/p99 latency, status counts and the server's RSS before and after (read from its
/metrics: `process_resident_memory_bytes`). It passes with no 5xx, no lost request (every request answered),
and RSS growth under 10% across the measured requests (after `warmup` requests, which settle the allocators).
"""
from __future__ import annotations

import collections
import threading
import time
import urllib.parse

from k3trt.contract.errors import InvalidArgumentError
from k3trt.verify.serving_bench import percentile

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_RSS_GROWTH = 0.10


def check_loopback(url: str) -> str:
    host = urllib.parse.urlparse(url).hostname
    if host not in LOOPBACK:
        raise InvalidArgumentError(f"--url {url!r} is not a loopback address", accepted=", ".join(LOOPBACK),
                                   fix="run the load test on the server's machine, e.g. --url http://127.0.0.1:8000")
    return url.rstrip("/")


def server_rss(client, url: str) -> float:
    """The server's resident set size in bytes, from its Prometheus text."""
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    raise InvalidArgumentError(f"{url}/metrics has no process_resident_memory_bytes",
                               fix="point --url at a `k3trt serve` on Linux")


def wait_ready(client, url: str, timeout_s: float = 300.0, log=print) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if client.get(f"{url}/readyz").status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    raise InvalidArgumentError(f"{url} did not become ready in {timeout_s:g} s (--timeout)",
                               fix="start the server (`k3trt serve ...`) or check --url and the server's log")


def free_port() -> int:
    """A free loopback port for a server this process starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_process(base: str, server, timeout_s: float = 300.0) -> None:
    """Until `base`/readyz answers 200 from the server process `server` (a Popen) this process started; its
    exit before that is an error, as is the timeout."""
    import urllib.request

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"k3trt serve exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while loading
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} was not ready within {timeout_s:g} s")


def drive(url: str, body: dict, requests: int, concurrency: int, timeout_s: float) -> tuple[list, collections.Counter]:
    """Send `requests` POSTs from `concurrency` threads; every request ends in a status or an error name."""
    import httpx

    latencies, statuses, lock = [], collections.Counter(), threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=timeout_s) as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    status = str(session.post(f"{url}/v1/images/generations", json={**body, "seed": i}).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses


def run_loadtest(url: str, *, requests: int = 500, concurrency: int = 8, warmup: int = 20, body: dict,
                 timeout_s: float = 120.0, log=print) -> dict:
    import httpx

    url = check_loopback(url)
    with httpx.Client(timeout=min(30.0, timeout_s)) as client:
        wait_ready(client, url, timeout_s, log=log)  # --timeout bounds the wait for a dead server too
        if warmup:
            log(f"warm-up: {warmup} requests")
            drive(url, body, warmup, concurrency, timeout_s)
        rss_before = server_rss(client, url)
        log(f"load: {requests} requests from {concurrency} clients, body {body}")
        start = time.perf_counter()
        latencies, statuses = drive(url, body, requests, concurrency, timeout_s)
        wall = time.perf_counter() - start
        rss_after = server_rss(client, url)
    answered = sum(n for s, n in statuses.items() if s.isdigit())
    server_errors = sum(n for s, n in statuses.items() if s.isdigit() and s.startswith("5"))
    growth = rss_after / rss_before - 1.0
    return {"url": url, "requests": requests, "concurrency": concurrency, "warmup": warmup, "body": body,
            "wall_s": wall, "requests_per_s": requests / wall,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99), "statuses": dict(sorted(statuses.items())),
            "answered": answered, "rss_before_mib": rss_before / 2 ** 20, "rss_after_mib": rss_after / 2 ** 20,
            "rss_growth": growth,
            "ok": answered == requests and server_errors == 0 and growth < MAX_RSS_GROWTH}


def format_report(r: dict) -> str:
    return "\n".join([
        f"{r['requests']} requests, {r['concurrency']} clients, {r['wall_s']:.1f} s: {r['requests_per_s']:.2f} req/s",
        f"latency p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, p99 {r['p99_s']:.3f} s",
        f"status counts {r['statuses']} (answered {r['answered']}/{r['requests']})",
        f"server RSS {r['rss_before_mib']:.1f} MiB -> {r['rss_after_mib']:.1f} MiB ({r['rss_growth'] * 100:+.2f}%)",
        f"{'PASS' if r['ok'] else 'FAIL'}: no 5xx, no lost request, RSS growth < {MAX_RSS_GROWTH:.0%}"])
