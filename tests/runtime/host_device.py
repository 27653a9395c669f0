"""A host-simulated device for the TensorRT backend's device seam (k3trt.runtime.backends.device), used with the
TensorRT stand-in (tests/trt_sim): memory is host memory (256-byte aligned, as cudaMalloc's), work runs in
order as it is enqueued, and a CUDA graph is the stand-in's `_sim.capture`: it records each launch with the
shapes and addresses bound at capture, and replays exactly those.

What a GPU would refuse, it refuses:
- a capture in "global" mode makes other threads' unsafe calls (allocation, event synchronization, another
  capture) fail, as cudaStreamCaptureModeGlobal does; "thread_local" confines that to the capturing thread;
- `activate()` sets the calling thread's current device, which `current_index()` reports (tests check what was
  current when TensorRT objects were made).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time

import torch

ALIGNMENT = 256


class CaptureViolation(RuntimeError):
    """What CUDA reports for an unsafe call while another thread captures in global mode."""


class HostStream:
    _handles = itertools.count(0x5000)

    def __init__(self, index: int):
        self.index, self.handle = index, next(HostStream._handles)


class HostEvent:
    def __init__(self, device: "HostDevice"):
        self.device, self.time = device, None

    def record(self, stream) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        self.device.check_unsafe_call("cudaEventSynchronize")

    def seconds_since(self, begin: "HostEvent") -> float:
        return self.time - begin.time


class HostGraph:
    def __init__(self):
        self.captured = None

    def replay(self) -> None:
        if self.captured is None:
            raise RuntimeError("replay of a graph that was never captured")
        self.captured.replay()


class HostDevice:
    """Device `index` of a simulated machine; state shared by all instances is class-level."""

    _local = threading.local()
    _global_capture: list[int] = []  # thread ids capturing in global mode
    on_capture = None  # test hook: called (with the capturing device) while a capture is open

    def __init__(self, index: int = 0):
        self.index = int(index)
        self._caller = HostStream(self.index)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def current_index(cls) -> int:
        return getattr(cls._local, "index", 0)

    @contextlib.contextmanager
    def activate(self):
        previous = self.current_index()
        HostDevice._local.index = self.index
        try:
            yield
        finally:
            HostDevice._local.index = previous

    def describe(self) -> tuple[str, tuple[int, int]]:
        import tensorrt

        state = tensorrt._sim.state()
        return state.gpu_name, tuple(state.compute_capability)

    def check_unsafe_call(self, what: str) -> None:
        others = [t for t in HostDevice._global_capture if t != threading.get_ident()]
        if others:
            raise CaptureViolation(f"{what}: operation not permitted when stream is capturing "
                                   "(cudaErrorStreamCaptureUnsupported; another thread captures in global mode)")

    def new_stream(self) -> HostStream:
        return HostStream(self.index)

    def caller_stream(self) -> HostStream:
        return self._caller

    def handle(self, stream: HostStream) -> int:
        return stream.handle

    def wait(self, stream, other) -> None:
        pass  # in-order host execution: every earlier call has finished

    def using(self, stream):
        return contextlib.nullcontext()

    def timing_event(self) -> HostEvent:
        return HostEvent(self)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        self.check_unsafe_call("cudaMalloc")
        size = torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(int(numel) * size + ALIGNMENT, dtype=torch.uint8)
        skip = -raw.data_ptr() % ALIGNMENT
        return raw[skip:skip + int(numel) * size].view(dtype)

    def new_graph(self) -> HostGraph:
        return HostGraph()

    @contextlib.contextmanager
    def capture(self, graph: HostGraph, stream: HostStream, mode: str = "thread_local"):
        import tensorrt

        if mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(f"unknown capture mode {mode!r}")
        self.check_unsafe_call("cudaStreamBeginCapture")
        if mode == "global":
            HostDevice._global_capture.append(threading.get_ident())
        try:
            with tensorrt._sim.capture(stream.handle) as captured:
                yield
                if HostDevice.on_capture is not None:
                    HostDevice.on_capture(self)
            graph.captured = captured
        finally:
            if mode == "global":
                HostDevice._global_capture.remove(threading.get_ident())


@contextlib.contextmanager
def host_devices():
    """The backend's device seam answered by HostDevice (k3trt.runtime.tensorrt_env.use_device)."""
    from k3trt.runtime import tensorrt_env

    previous = tensorrt_env.use_device(HostDevice)
    try:
        yield HostDevice
    finally:
        tensorrt_env.use_device(previous)
        HostDevice.on_capture = None
