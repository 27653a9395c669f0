"""TensorRT backend: prebuilt engines from the manifest, run on torch CUDA tensors.

- Each component's engine is chosen by precision from the manifest, checked for compatibility (TensorRT
  version, compute capability, ONNX hash) and deserialized once.
- A small pool of execution contexts per engine serves concurrent requests; each slot owns a CUDA stream and
  preallocated output buffers that only grow.
- Inputs are bound with `set_input_shape` + `set_tensor_address`; `execute_async_v3` runs on the slot's torch
  stream. With `cuda_graphs=True` each static input shape is captured once and replayed from then on (with
  its own fixed buffers, so a graph never sees an address change under it).
- `timings[component]` gets the GPU time of each call in seconds (CUDA events), as the base class records.
Outputs are copies: a pooled slot's buffers are reused by the next call, so handing them out would alias.
"""
from __future__ import annotations

import threading
import time
from typing import Mapping

import torch
from k3trt.contract.engine_compat import check_engine_compatible, check_feeds_in_profile, select_engine
from k3trt.contract.errors import ArtifactError, BackendUnavailableError
from k3trt.contract.manifest import FileRecord
from k3trt.runtime.backends.base import Backend, StageTimings, check_feeds
from k3trt.runtime.backends.pool import ResourcePool


class _Buffers:
    """Named device buffers that grow but never shrink: reallocation only when a shape needs more room."""

    def __init__(self, device: torch.device):
        self.device, self.store = device, {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= int(dim)
        flat = self.store.get(name)
        if flat is None or flat.dtype != dtype or flat.numel() < numel:
            flat = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self.store[name] = flat
        return flat[:numel].view(shape)


class _Slot:
    """One execution context with its stream, output buffers and captured graphs."""

    def __init__(self, engine, device: torch.device):
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailableError("TensorRT could not create an execution context (out of GPU memory?)",
                                          fix="lower max_contexts, or free GPU memory")
        self.stream = torch.cuda.Stream(device=device)
        self.outputs = _Buffers(device)
        self.graphs: dict[tuple, tuple] = {}  # shape key -> (graph, inputs, outputs)


class _Engine:
    def __init__(self, name: str, entry: Mapping, engine, max_contexts: int, device: torch.device,
                 context_timeout: float | None = 30.0):
        from k3trt.runtime.tensorrt_env import require_tensorrt, torch_dtype

        trt = require_tensorrt()
        self.name, self.entry, self.engine, self.device = name, entry, engine, device
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        # at most max_contexts contexts; a caller waits up to context_timeout s for one (BackendBusyError after)
        self.pool: ResourcePool[_Slot] = ResourcePool(lambda: _Slot(engine, device), max_contexts,
                                                      timeout=context_timeout, name=f"{name} execution context")


class TrtBackend(Backend):
    name = "trt"
    baseline = "default"  # no --precision: the cards' defaults, what a plain `k3trt build` makes

    def __init__(self, manifest, precision=None, *, cuda_graphs: bool = False, max_contexts: int = 2,
                 device: int = 0, verify: bool = True, log=None, context_timeout: float | None = 30.0):
        """`precision`: one name, a per-component map, or None / "default" for the engines' defaults (bf16 text
        encoder, fp16 U-Net and MoVQ: what a plain `k3trt build` makes). `context_timeout`: seconds a call waits
        for a free execution context before BackendBusyError (None: forever)."""
        from k3trt.runtime.tensorrt_env import current_env, require_cuda, require_tensorrt

        self._trt = require_tensorrt()
        require_cuda()
        super().__init__(manifest, precision)
        self.env = current_env(device)
        self.cuda_graphs, self.max_contexts, self.verify = cuda_graphs, max(1, int(max_contexts)), verify
        self.context_timeout = context_timeout
        self._device = torch.device("cuda", device)
        self._engines: dict[str, _Engine] = {}
        self._load_lock = threading.Lock()
        self._runtime = None
        self.warnings: list[str] = []
        self.log = log or (lambda message: None)
        self.host_timings = StageTimings()  # host-side seconds per call (bounded); `timings` holds GPU time

    @property
    def device(self) -> torch.device:
        return self._device

    # --- engines
    def engine(self, component: str) -> _Engine:
        with self._load_lock:  # deserialize once, even with concurrent first calls
            if component not in self._engines:
                self._engines[component] = self._load(component)
            return self._engines[component]

    def _load(self, component: str) -> _Engine:
        from k3trt.runtime.tensorrt_env import trt_logger

        resolved = self.resolve(component)
        name, entry = select_engine(self.manifest.data.get("engines", {}), component, resolved.precision.value,
                                    str(self.manifest.root))
        record = self.manifest.onnx(component, entry.get("variant", resolved.variant))
        self.warnings += check_engine_compatible(name, entry, self.env, onnx_sha256=record.graph.sha256,
                                                 artifacts=str(self.manifest.root))
        file = FileRecord(**entry["file"])
        if self.verify:
            self.manifest.verify([file])
        if self._runtime is None:
            self._runtime = self._trt.Runtime(trt_logger())
        with torch.cuda.device(self._device):
            engine = self._runtime.deserialize_cuda_engine(self.manifest.path(file.path).read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialize engine {name!r} ({file.path})",
                                fix=f"rebuild it: k3trt build --artifacts {self.manifest.root} --components "
                                    f"{component} --force")
        self.log(f"loaded {name} ({file.bytes / 2**20:.1f} MiB)")
        return _Engine(name, entry, engine, self.max_contexts, self._device, self.context_timeout)

    # --- running
    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feeds(self.record(component), feeds)
        start = time.perf_counter()
        out = self._run(component, feeds)
        self.host_timings.record(component, time.perf_counter() - start)
        return out

    def _run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        eng = self.engine(component)
        check_feeds_in_profile(eng.name, eng.profile, {k: tuple(v.shape) for k, v in feeds.items()})
        with eng.pool.slot() as slot:
            return self._execute(eng, slot, component, feeds)

    def _execute(self, eng: _Engine, slot: _Slot, component: str, feeds) -> dict[str, torch.Tensor]:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        slot.stream.wait_stream(torch.cuda.current_stream(self._device))  # feeds were made on the caller's stream
        with torch.cuda.stream(slot.stream):
            begin.record(slot.stream)
            inputs = {n: feeds[n].to(self._device, eng.dtypes[n]).contiguous() for n in eng.inputs}
            key = tuple(tuple(t.shape) for t in inputs.values())
            if self.cuda_graphs:
                outputs = self._replay(eng, slot, key, inputs)
            else:
                outputs = self._bind_and_enqueue(eng, slot, inputs, slot.outputs)
            result = {n: t.clone() for n, t in outputs.items()}
            end.record(slot.stream)
        end.synchronize()  # the slot goes back to the pool: its buffers must be free to reuse
        self.timings.record(component, begin.elapsed_time(end) / 1000.0)
        return result

    def _bind_and_enqueue(self, eng: _Engine, slot: _Slot, inputs, buffers: _Buffers) -> dict[str, torch.Tensor]:
        ctx = slot.context
        for name, tensor in inputs.items():
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in eng.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            outputs[name] = buffers.get(name, shape, eng.dtypes[name])
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        if not ctx.execute_async_v3(slot.stream.cuda_stream):
            raise ArtifactError(f"TensorRT failed to run engine {eng.name!r}",
                                fix="see the TensorRT log above; rebuild the engine if it persists")
        return outputs

    def _replay(self, eng: _Engine, slot: _Slot, key: tuple, inputs) -> dict[str, torch.Tensor]:
        """CUDA graph per static shape, with buffers owned by that graph (stable addresses)."""
        if key not in slot.graphs:
            static_in = {n: t.clone() for n, t in inputs.items()}
            static_out = _Buffers(self._device)
            self._bind_and_enqueue(eng, slot, static_in, static_out)  # TensorRT needs one run after a shape change
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=slot.stream):
                outputs = self._bind_and_enqueue(eng, slot, static_in, static_out)
            slot.graphs[key] = (graph, static_in, outputs)
        graph, static_in, outputs = slot.graphs[key]
        for name, tensor in inputs.items():
            static_in[name].copy_(tensor)
        graph.replay()
        return outputs

    def close(self) -> None:
        for eng in self._engines.values():
            for slot in eng.pool.drain():
                slot.graphs.clear()
                del slot.context
        self._engines.clear()
        self._runtime = None
