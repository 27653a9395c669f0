"""Locust against `k3trt serve` on loopback, twice in one run: clients that honour `Retry-After` and clients that
retry at once, the same server settings, and the figures of both side by side in one JSON file.

    python3 verify/load/run_locust.py --artifacts art --json docs/results/locust-tiny.json

The server gets a small queue (`--max-batch 2 --max-queue 2`) so that 8 users overload it and 429s happen;
each run's figures come from `locustfile.py` (goodput, p50/p95/p99, 429 share, 5xx, RSS before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from k3trt.verify.loadtest import free_port, wait_for_process

HERE = Path(__file__).resolve().parent


def locust_run(base: str, honour: bool, users: int, seconds: int, out: Path) -> dict:
    env = {**os.environ, "K3TRT_HONOUR_RETRY_AFTER": "1" if honour else "", "K3TRT_LOCUST_JSON": str(out)}
    subprocess.run([sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", base,
                    "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--only-summary", "--loglevel", "WARNING",
                    "--stop-timeout", "120"], env=env, check=False, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--json", required=True, help="where to write both runs' figures")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=30, help="per run")
    args = parser.parse_args(argv)
    if not (Path(args.artifacts) / "manifest.json").is_file():  # before the server starts
        parser.error(f"--artifacts {args.artifacts!r} holds no manifest.json: pass a folder `k3trt export` wrote")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "k3trt.cli.main", "serve", "--artifacts", args.artifacts,
                               "--port", str(port), "--max-batch", "2", "--max-queue", "2", "--threads", "1",
                               "--default-resolution", "64x64", "--default-steps", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_process(base, server)
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        runs = {name: locust_run(base, honour, args.users, args.seconds, out.with_suffix(f".{name}.tmp"))
                for name, honour in (("retry_at_once", False), ("honour_retry_after", True))}
    finally:
        server.terminate()
        server.wait(60)
    for name in runs:
        out.with_suffix(f".{name}.tmp").unlink()
    result = {"runs": runs, "server": "k3trt serve --max-batch 2 --max-queue 2 --threads 1 (tiny preset, 64x64, 1 step)",
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "command": " ".join(["python3", "verify/load/run_locust.py", *(argv if argv is not None else sys.argv[1:])])}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
