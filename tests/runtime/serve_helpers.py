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
