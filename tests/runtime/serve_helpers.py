"""Starting `k3trt serve` as a process for the serving tests (plain and Ray): a free loopback port, the process
with its output captured, and a kill on the way out if a test left it running."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(artifacts, *options: str):
    """`k3trt serve --artifacts ART --port P OPTIONS...`; yields (base URL, Popen). stdout+stderr go to a pipe
    (read it after the process ended)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "k3trt.cli.main", "serve", "--artifacts", str(artifacts),
                               "--port", str(port), *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@contextlib.contextmanager
def running(service, **config):
    """`create_app(service)` on uvicorn at an ephemeral loopback port, in a thread; yields the base URL."""
    import threading
    import time

    import uvicorn

    from k3trt.runtime.serving.http import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="error",
                                          **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(base: str, timeout: float = 120.0) -> None:
    import time

    import httpx

    end = time.monotonic() + timeout
    while httpx.get(f"{base}/readyz").status_code != 200:
        assert time.monotonic() < end, "the service never became ready"
        time.sleep(0.05)
