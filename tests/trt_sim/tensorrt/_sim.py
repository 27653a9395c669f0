"""The stand-in's control panel for tests (not TensorRT API): which release and GPU it simulates, and hooks
for what a device seam needs (graph capture and replay of enqueued launches)."""
from __future__ import annotations

import contextlib

from ._api import NEWEST, OLDEST, STATE

VERSIONS = (OLDEST, NEWEST)


def impersonate(version: str) -> None:
    """Behave as TensorRT `version` (one of VERSIONS: the surfaces engines/api holds)."""
    if version not in VERSIONS:
        raise ValueError(f"no API surface for TensorRT {version}; have {VERSIONS}")
    STATE.version = version


def reset() -> None:
    """Back to the defaults: TensorRT 11.4 on an A100 (compute capability 8.0), driver OK."""
    STATE.reset()


def set_device(name: str, compute_capability: tuple[int, int]) -> None:
    STATE.gpu_name, STATE.compute_capability = name, tuple(compute_capability)


def set_driver_ok(ok: bool) -> None:
    """False: Builder/Runtime factories return nullptr, as with a driver older than the wheel's CUDA needs."""
    STATE.driver_ok = bool(ok)


def state():
    return STATE


class Graph:
    """A captured CUDA graph: the launches enqueued during capture, with the shapes and addresses bound then.
    `replay()` runs exactly those, not what the contexts hold now (a stale graph gives a stale result)."""

    def __init__(self):
        self.launches: list[dict] = []

    def replay(self) -> None:
        from ._runtime import run_snapshot

        for launch in self.launches:
            run_snapshot(launch)


@contextlib.contextmanager
def capture(stream_handle: int):
    """Record, instead of run, every execute_async_v3 on `stream_handle` until the block ends."""
    graph = Graph()
    STATE.capturing[int(stream_handle)] = graph.launches
    try:
        yield graph
    finally:
        STATE.capturing.pop(int(stream_handle), None)
