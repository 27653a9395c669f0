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


# ------------------------------------------------------------------------------------------ test utilities
def host_buffer(shape, dtype):
    """A zeroed torch CPU tensor at a 256-byte aligned address, as cudaMalloc returns device memory."""
    import math

    import torch

    count = max(math.prod(shape), 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(count + STATE.alignment // itemsize + 1, dtype=dtype)
    skip = (-raw.data_ptr() % STATE.alignment) // itemsize
    return raw[skip:skip + math.prod(shape)].view(tuple(shape))


TORCH_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


def run(engine, feeds: dict) -> dict:
    """Run `engine` once on `feeds` (torch tensors) the way a backend does: input shapes, addresses of aligned
    buffers, execute_async_v3; returns the outputs. Fails loudly on any refused call."""
    import torch

    from ._types import TensorIOMode

    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    buffers = {}
    for name in (n for n in names if engine.get_tensor_mode(n) == TensorIOMode.INPUT):
        dtype = getattr(torch, TORCH_TYPES[engine.get_tensor_dtype(name).name])
        buffers[name] = host_buffer(tuple(feeds[name].shape), dtype)
        buffers[name].copy_(feeds[name].to(dtype))
        assert context.set_input_shape(name, tuple(feeds[name].shape)), f"set_input_shape({name}) refused"
        assert context.set_tensor_address(name, buffers[name].data_ptr())
    for name in (n for n in names if engine.get_tensor_mode(n) == TensorIOMode.OUTPUT):
        dtype = getattr(torch, TORCH_TYPES[engine.get_tensor_dtype(name).name])
        buffers[name] = host_buffer(tuple(context.get_tensor_shape(name)), dtype)
        assert context.set_tensor_address(name, buffers[name].data_ptr())
    assert context.execute_async_v3(0), "execute_async_v3 refused (see the logger)"
    return {n: buffers[n].clone() for n in names if engine.get_tensor_mode(n) == TensorIOMode.OUTPUT}
