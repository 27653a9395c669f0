"""Locust users for `k3trt serve` on loopback: text-to-image requests as fast as the server answers them.

    locust -f verify/load/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 8 -t 60s --only-summary

Environment (Locust takes its options from the command line; these are this file's own):
- `K3TRT_HONOUR_RETRY_AFTER=1`: after a 429, a user waits the seconds its `Retry-After` names before the next
  request (a well-behaved client); unset: it retries at once (a hammering one).
- `K3TRT_LOCUST_JSON=FILE`: at the end, write goodput, p50/p95/p99, the 429 share, 5xx and other failures, and the
  server's RSS before and after (from its /metrics) to FILE.
- `K3TRT_LOCUST_STEPS` (default 1), `K3TRT_LOCUST_SIZE` (default 64x64): the request.

A 429 is counted as a failure named "429 (queue full)", so Locust's own tables show the share too.
"""
from __future__ import annotations

import collections
import json
import os
import time
import urllib.request

from locust import HttpUser, constant, events, task

HONOUR = os.environ.get("K3TRT_HONOUR_RETRY_AFTER", "") not in ("", "0")
STEPS = int(os.environ.get("K3TRT_LOCUST_STEPS", "1"))
SIZE = os.environ.get("K3TRT_LOCUST_SIZE", "64x64")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_RUN: dict = {}


def server_rss(host: str) -> float | None:
    """process_resident_memory_bytes from the server's Prometheus text (None if it has none)."""
    with urllib.request.urlopen(f"{host}/metrics", timeout=30) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return float(line.split()[1])
    return None


@events.test_start.add_listener
def _start(environment, **_):
    host = environment.host.rstrip("/")
    if host.split("://")[-1].split(":")[0] not in LOOPBACK:
        raise SystemExit(f"--host {host!r} is not a loopback address: this load test runs on the server's machine")
    _RUN.update(host=host, started=time.monotonic(), rss_before=server_rss(host), retry_after_429=0,
                statuses=collections.Counter())


@events.test_stop.add_listener
def _stop(environment, **_):
    path = os.environ.get("K3TRT_LOCUST_JSON")
    if not path:
        return
    total = environment.stats.total
    seconds = time.monotonic() - _RUN["started"]
    statuses = _RUN["statuses"]
    answered = sum(statuses.values())
    summary = {
        "honour_retry_after": HONOUR, "users": environment.runner.user_count if environment.runner else None,
        "seconds": round(seconds, 1), "requests": answered, "statuses": {str(k): n for k, n in sorted(statuses.items())},
        "goodput_per_s": round(statuses[200] / seconds, 3) if seconds else None,
        "share_429": round(statuses[429] / answered, 4) if answered else None,
        "every_429_had_retry_after": _RUN["retry_after_429"] == statuses[429],
        "server_errors_5xx": sum(n for code, n in statuses.items() if code >= 500),
        "connection_failures": statuses[0],  # Locust reports a refused or reset connection as status 0
        "latency_ms_ok_and_refused": {f"p{int(q * 100)}": total.get_response_time_percentile(q)
                                      for q in (0.5, 0.95, 0.99)},
        "rss_mb_before": round(_RUN["rss_before"] / 2**20, 1) if _RUN["rss_before"] else None,
        "rss_mb_after": round(server_rss(_RUN["host"]) / 2**20, 1) if _RUN["rss_before"] else None,
        "request": {"steps": STEPS, "size": SIZE},
    }
    with open(path, "w") as handle:
        json.dump(summary, handle, indent=2)


class ImageClient(HttpUser):
    wait_time = constant(0)

    @task
    def generate(self):
        body = {"prompt": "a red fox in a snowy forest", "size": SIZE, "steps": STEPS}
        with self.client.post("/v1/images/generations", json=body, catch_response=True,
                              name="/v1/images/generations") as answer:
            _RUN["statuses"][answer.status_code] += 1
            if answer.status_code == 429:
                retry_after = answer.headers.get("Retry-After")
                _RUN["retry_after_429"] += retry_after is not None
                answer.failure("429 (queue full)")
                if HONOUR and retry_after:
                    time.sleep(float(retry_after))  # gevent-patched: this user waits, the others run
            elif answer.status_code != 200:
                answer.failure(f"HTTP {answer.status_code}")
