"""The TensorRT backend's device seam: CUDA streams, events, memory and graphs behind one small interface.

`TrtBackend` touches the GPU only through these methods, so the same backend code runs on a real GPU
(`TorchCuda`, torch.cuda underneath) and, in the tests, on a host-simulated device with the TensorRT stand-in
(tests/runtime/host_device.py), where a simulated CUDA graph replays exactly the work it captured.

The interface, by what the backend needs:
- placement: `activate()` makes the device current for the calling thread (TensorRT creates contexts and
  deserializes engines on the current device), `describe()` names it and its compute capability;
- streams: `new_stream()`, `caller_stream()` (where the caller's feeds were made), `handle(stream)` (the
  `cudaStream_t` TensorRT's `execute_async_v3` takes), `wait(stream, other)`, `using(stream)`;
- events: `timing_event()` -> an object with `record(stream)`, `synchronize()`, `seconds_since(begin)`;
- memory: `empty(numel, dtype)` (a device tensor; its `data_ptr()` is what TensorRT binds);
- graphs: `new_graph()` -> an object with `replay()`, and `capture(graph, stream, mode)` (a context manager).
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch

CAPTURE_MODE = "thread_local"  # other threads' CUDA calls during a capture neither fail nor join the graph


class DeviceApi(Protocol):
    index: int

    @property
    def torch_device(self) -> torch.device: ...

    def activate(self) -> contextlib.AbstractContextManager: ...

    def describe(self) -> tuple[str, tuple[int, int]]: ...

    def new_stream(self): ...

    def caller_stream(self): ...

    def handle(self, stream) -> int: ...

    def wait(self, stream, other) -> None: ...

    def using(self, stream) -> contextlib.AbstractContextManager: ...

    def timing_event(self): ...

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor: ...

    def new_graph(self): ...

    def capture(self, graph, stream, mode: str = CAPTURE_MODE) -> contextlib.AbstractContextManager: ...


class _TorchEvent:
    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)

    def record(self, stream) -> None:
        self.event.record(stream)

    def synchronize(self) -> None:
        self.event.synchronize()

    def seconds_since(self, begin: "_TorchEvent") -> float:
        return begin.event.elapsed_time(self.event) / 1000.0


class TorchCuda:
    """The real device: torch.cuda on GPU `index`."""

    def __init__(self, index: int = 0):
        self.index = int(index)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def activate(self):
        return torch.cuda.device(self.index)

    def describe(self) -> tuple[str, tuple[int, int]]:
        return torch.cuda.get_device_name(self.index), tuple(torch.cuda.get_device_capability(self.index))

    def new_stream(self):
        return torch.cuda.Stream(device=self.torch_device)

    def caller_stream(self):
        return torch.cuda.current_stream(self.torch_device)

    def handle(self, stream) -> int:
        return stream.cuda_stream

    def wait(self, stream, other) -> None:
        stream.wait_stream(other)

    def using(self, stream):
        return torch.cuda.stream(stream)

    def timing_event(self) -> _TorchEvent:
        return _TorchEvent()

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(int(numel), dtype=dtype, device=self.torch_device)

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, stream, mode: str = CAPTURE_MODE):
        return torch.cuda.graph(graph, stream=stream, capture_error_mode=mode)
