"""TensorRT backend: prebuilt engines from the manifest, run on device tensors through one device seam.

- Each component's engine is chosen by precision from the manifest, checked for compatibility (TensorRT
  version, compute capability, ONNX hash) and deserialized once, on the configured device.
- Concurrency comes in lanes (`max_contexts` of them, shared by all engines): a lane is a stream, one
  activation-memory block as large as the largest loaded engine needs (contexts are created with
  user-managed memory, as NVIDIA's demo shares one block across engines), aligned I/O buffers that only grow,
  and the lane's execution contexts. A call holds one lane, so the engines of a lane never run at once and can
  share its block; memory is `max_contexts` x the largest engine's need, not the sum over engines.
- Inputs are copied into the lane's buffers (TensorRT needs aligned addresses; a caller's view may not be),
  bound with `set_input_shape` + `set_tensor_address` (each result checked: a refusal is a typed error naming
  the tensor, the shape and the profile), and run with `execute_async_v3` on the lane's stream.
- CUDA graphs (`cuda_graphs=True`): one execution context per captured graph. A context's captured kernels
  depend on state TensorRT keeps per context for its current shapes; a graph replayed after the same context
  was re-shaped for another graph replays stale state, and re-binding before replay is not enough (TensorRT
  needs an uncaptured enqueue after every shape change). A context per graph never changes shape after
  capture, and with the lane's shared memory it costs no activation memory of its own. Graphs are captured in
  thread-local mode (other threads' CUDA calls neither fail nor join the capture); at most MAX_GRAPHS per
  engine and lane are kept (least recently used dropped).
- Weight streaming (`weight_streaming={"text_encoder": bytes}`): the engine keeps that many bytes of its
  weights on the device and streams the rest; the engine must be built with TensorRT's WEIGHT_STREAMING flag.
- `timings[component]` gets the device time of each call in seconds (timing events).
Outputs are copies: a lane's buffers are reused by the next call, so handing them out would alias.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Mapping

import torch

from k3trt.contract.cards import COMPONENTS
from k3trt.contract.engine_compat import (check_engine_compatible, check_feeds_in_profile, engine_axes,
                                          select_engine)
from k3trt.contract.errors import (ArtifactError, BackendRuntimeError, BackendUnavailableError, InvalidArgumentError,
                                   ShapeError)
from k3trt.contract.manifest import FileRecord
from k3trt.runtime.backends.base import Backend, StageTimings, check_feeds
from k3trt.runtime.backends.device import CAPTURE_MODE
from k3trt.runtime.backends.pool import ResourcePool
from k3trt.runtime.tensorrt_env import current_env, require_tensorrt, torch_dtype, trt_logger
from k3trt.runtime.tensorrt_env import device_api as default_device_api

MAX_GRAPHS = 16  # captured graphs kept per engine and lane (each holds a context and its I/O buffers)
ALIGNMENT = 256  # bytes; TensorRT's I/O and activation-memory addresses must be aligned

# Members renamed across the supported range: (TensorRT 10.1+ and 11 name, TensorRT 10.0 name). The first one
# the object has is used; tests/runtime/test_rt_trt_backend.py checks each against engines/api/*.json.
RENAMED = {"device_memory_size": ("device_memory_size_v2", "device_memory_size"),
           "weight_streaming_budget": ("weight_streaming_budget_v2", "weight_streaming_budget")}


def member_name(obj, member: str) -> str:
    """The name of `member` on this TensorRT (see RENAMED)."""
    return next((name for name in RENAMED[member] if hasattr(obj, name)), RENAMED[member][0])


def set_device_memory(context, block: torch.Tensor) -> None:
    """Point a user-managed context at `block` (11 and 10.1+: set_device_memory; 10.0: the property)."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(block.data_ptr(), block.numel() * block.element_size())
    else:
        context.device_memory = block.data_ptr()


class _Buffers:
    """Named, aligned device buffers that grow but never shrink."""

    def __init__(self, device_api):
        self.device_api, self.store = device_api, {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= int(dim)
        flat = self.store.get(name)
        if flat is None or flat.dtype != dtype or flat.numel() < numel:
            flat = self.store[name] = self.device_api.empty(max(numel, 1), dtype)
        return flat[:numel].view(shape)


class _Engine:
    """A deserialized engine and what the backend reads from it once."""

    def __init__(self, trt, name: str, entry: Mapping, engine):
        self.name, self.entry, self.engine = name, entry, engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        self.memory_bytes = int(getattr(engine, member_name(engine, "device_memory_size")))

    def span(self, name: str) -> str:
        lo, opt, hi = self.profile[name]
        return f"static {lo}" if lo == hi else f"{lo} .. {hi} (opt {opt})"


class _Lane:
    """One unit of concurrency across engines: a stream, a shared activation-memory block, buffers, contexts."""

    def __init__(self, device_api):
        self.stream = device_api.new_stream()
        self.memory: torch.Tensor | None = None
        self.contexts: dict[tuple, object] = {}  # (engine, None) direct; (engine, shape key) one per graph
        self.buffers: dict[str, _Buffers] = collections.defaultdict(lambda: _Buffers(device_api))
        self.graphs: dict[str, collections.OrderedDict] = collections.defaultdict(collections.OrderedDict)


class TrtBackend(Backend):
    name = "trt"
    baseline = "default"  # no --precision: the cards' defaults, what a plain `k3trt build` makes

    def __init__(self, manifest, precision=None, *, cuda_graphs: bool = False, max_contexts: int = 2,
                 device: int = 0, verify: bool = True, log=None, context_timeout: float | None = 30.0,
                 weight_streaming: Mapping[str, int] | None = None, device_api=None):
        """`precision`: one name, a per-component map, or None / "default" for the engines' defaults (bf16 text
        encoder, fp16 U-Net and MoVQ: what a plain `k3trt build` makes). `max_contexts`: calls that may run at
        once (lanes). `context_timeout`: seconds a call waits for a free lane before BackendBusyError (None:
        forever). `weight_streaming`: component -> bytes of its weights kept on the device (engines built with
        weight streaming; the text encoder is the one that may not fit). `device_api`: the device seam
        (default: torch.cuda on GPU `device`; tests pass a host-simulated one)."""
        self._trt = require_tensorrt()
        self._device_api = device_api if device_api is not None else default_device_api(device)
        super().__init__(manifest, precision)
        self.weight_streaming = _check_weight_streaming(weight_streaming)
        self.env = current_env(device, self._device_api)
        self.cuda_graphs, self.max_contexts, self.verify = cuda_graphs, max(1, int(max_contexts)), verify
        self.context_timeout = context_timeout
        self._engines: dict[str, _Engine] = {}
        self._load_lock = threading.Lock()
        self._runtime = None
        self._lanes: ResourcePool[_Lane] = ResourcePool(lambda: _Lane(self._device_api), self.max_contexts,
                                                        timeout=context_timeout, name="TensorRT lane")
        self.warnings: list[str] = []
        self.log = log or (lambda message: None)
        self.host_timings = StageTimings()  # host-side seconds per call (bounded); `timings` holds device time

    @property
    def device(self) -> torch.device:
        return self._device_api.torch_device

    # --- limits
    def axes(self, component: str) -> dict[str, tuple[int, int]]:
        """The ONNX axes narrowed to the built engine's optimization profile (its manifest entry), so callers
        size requests and batches by what the engine takes, not by what the ONNX could."""
        return engine_axes(self.record(component).axes, self._entry(component))

    def _entry(self, component: str) -> tuple[str, Mapping]:
        return select_engine(self.manifest.data.get("engines", {}), component,
                             self.resolve(component).precision.value, str(self.manifest.root))

    # --- engines
    def engine(self, component: str) -> _Engine:
        with self._load_lock:  # deserialize once, even with concurrent first calls
            if component not in self._engines:
                self._engines[component] = self._load(component)
            return self._engines[component]

    def _load(self, component: str) -> _Engine:
        name, entry = self._entry(component)
        record = self.manifest.onnx(component, entry.get("variant", self.resolve(component).variant))
        self.warnings += check_engine_compatible(name, entry, self.env, onnx_sha256=record.graph.sha256,
                                                 artifacts=str(self.manifest.root))
        file = FileRecord(**entry["file"])
        if self.verify:
            self.manifest.verify([file])
        with self._device_api.activate():  # the engine's memory lives on the configured device
            if self._runtime is None:
                self._runtime = self._trt.Runtime(trt_logger())
            engine = self._runtime.deserialize_cuda_engine(self.manifest.path(file.path).read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialize engine {name!r} ({file.path})",
                                fix=f"rebuild it: k3trt build --artifacts {self.manifest.root} --components "
                                    f"{component} --force")
        if component in self.weight_streaming:
            self._stream_weights(name, engine, self.weight_streaming[component])
        self.log(f"loaded {name} ({file.bytes / 2**20:.1f} MiB)")
        return _Engine(self._trt, name, entry, engine)

    def _stream_weights(self, name: str, engine, budget: int) -> None:
        """Keep `budget` bytes of the engine's weights on the device; set before any context exists."""
        streamable = int(engine.streamable_weights_size)
        if streamable <= 0:
            raise InvalidArgumentError(f"weight streaming asked for engine {name!r}, built without it",
                                       accepted="engines built with TensorRT's WEIGHT_STREAMING flag",
                                       fix="rebuild it with weight streaming, or drop weight_streaming for it")
        if not 1 <= budget <= streamable:
            raise InvalidArgumentError(f"weight_streaming budget {budget} bytes for engine {name!r}",
                                       accepted=f"1..{streamable} bytes (its streamable weights)",
                                       fix=f"e.g. {streamable // 2} (half of its weights on the device)")
        setattr(engine, member_name(engine, "weight_streaming_budget"), int(budget))

    def _ready(self, component: str) -> None:
        self.engine(component)  # deserialized now: the engine file's hash and compatibility checked before step 1

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
        with self._lanes.slot() as lane:
            return self._execute(eng, lane, component, feeds)

    def _execute(self, eng: _Engine, lane: _Lane, component: str, feeds) -> dict[str, torch.Tensor]:
        dev = self._device_api
        begin, end = dev.timing_event(), dev.timing_event()
        dev.wait(lane.stream, dev.caller_stream())  # feeds were made on the caller's stream
        with dev.using(lane.stream):
            begin.record(lane.stream)
            if self.cuda_graphs:
                outputs = self._replay(eng, lane, feeds)
            else:
                outputs = self._direct(eng, lane, feeds)
            result = {n: t.clone() for n, t in outputs.items()}
            end.record(lane.stream)
        end.synchronize()  # the lane goes back to the pool: its buffers must be free to reuse
        self.timings.record(component, end.seconds_since(begin))
        return result

    def _direct(self, eng: _Engine, lane: _Lane, feeds) -> dict[str, torch.Tensor]:
        buffers = lane.buffers[eng.name]
        inputs = {n: buffers.get(n, tuple(feeds[n].shape), eng.dtypes[n]).copy_(feeds[n]) for n in eng.inputs}
        context = self._context(eng, lane, None)
        outputs = self._bind(eng, context, inputs, buffers)
        self._enqueue(eng, context, lane)
        return outputs

    def _replay(self, eng: _Engine, lane: _Lane, feeds) -> dict[str, torch.Tensor]:
        key = tuple(tuple(feeds[n].shape) for n in eng.inputs)
        graphs = lane.graphs[eng.name]
        if key not in graphs:
            graphs[key] = self._capture(eng, lane, key, feeds)
            while len(graphs) > MAX_GRAPHS:
                old, _ = graphs.popitem(last=False)
                lane.contexts.pop((eng.name, old), None)
        graphs.move_to_end(key)
        graph, inputs, outputs = graphs[key]
        for name, tensor in inputs.items():
            tensor.copy_(feeds[name])
        graph.replay()
        return outputs

    def _capture(self, eng: _Engine, lane: _Lane, key: tuple, feeds) -> tuple:
        """This shape's own context and buffers (stable shapes and addresses), one warm-up run (TensorRT needs
        an enqueue after a shape change before capture), then the capture."""
        dev, buffers = self._device_api, _Buffers(self._device_api)
        inputs = {n: buffers.get(n, tuple(feeds[n].shape), eng.dtypes[n]).copy_(feeds[n]) for n in eng.inputs}
        context = self._context(eng, lane, key)
        outputs = self._bind(eng, context, inputs, buffers)
        self._enqueue(eng, context, lane)
        graph = dev.new_graph()
        with dev.capture(graph, lane.stream, CAPTURE_MODE):
            self._enqueue(eng, context, lane)
        return graph, inputs, outputs

    # --- contexts, memory, binding
    def _context(self, eng: _Engine, lane: _Lane, key):
        context = lane.contexts.get((eng.name, key))
        if context is None:
            self._ensure_memory(lane, eng.memory_bytes)
            with self._device_api.activate():  # contexts belong to the current device
                context = eng.engine.create_execution_context(
                    self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise BackendUnavailableError(f"TensorRT could not create an execution context for {eng.name!r}",
                                              fix="lower max_contexts, or free device memory")
            set_device_memory(context, lane.memory)
            lane.contexts[(eng.name, key)] = context
        return context

    def _ensure_memory(self, lane: _Lane, need: int) -> None:
        """Grow the lane's block to `need` bytes; its contexts move to the new block and its graphs (which hold
        the old address) are dropped, to be captured again."""
        if lane.memory is not None and lane.memory.numel() >= need:
            return
        with self._device_api.activate():
            lane.memory = self._device_api.empty(max(need, ALIGNMENT), torch.uint8)
        for context in lane.contexts.values():
            set_device_memory(context, lane.memory)
        for graphs in lane.graphs.values():
            graphs.clear()
        lane.contexts = {k: c for k, c in lane.contexts.items() if k[1] is None}

    def _bind(self, eng: _Engine, context, inputs, buffers: _Buffers) -> dict[str, torch.Tensor]:
        for name, tensor in inputs.items():
            shape = tuple(tensor.shape)
            if not context.set_input_shape(name, shape):
                raise ShapeError(f"TensorRT refused shape {shape} for input {name!r} of engine {eng.name!r}",
                                 accepted=f"its optimization profile: {eng.span(name)}",
                                 fix="change the request to fit the profile, or rebuild the engine for it")
            self._address(eng, context, name, tensor)
        outputs = {}
        for name in eng.outputs:
            outputs[name] = buffers.get(name, tuple(context.get_tensor_shape(name)), eng.dtypes[name])
            self._address(eng, context, name, outputs[name])
        return outputs

    @staticmethod
    def _address(eng: _Engine, context, name: str, tensor: torch.Tensor) -> None:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise BackendRuntimeError(
                f"TensorRT refused the address {tensor.data_ptr():#x} of tensor {name!r} {tuple(tensor.shape)} "
                f"for engine {eng.name!r}", accepted=f"a device address aligned to {ALIGNMENT} bytes",
                fix="report this: the backend's own buffers are aligned")

    def _enqueue(self, eng: _Engine, context, lane: _Lane) -> None:
        if not context.execute_async_v3(self._device_api.handle(lane.stream)):
            raise BackendRuntimeError(f"TensorRT failed to run engine {eng.name!r}",
                                      fix="see the TensorRT log above; rebuild the engine if it persists")

    # --- weights by name (LoRA, runtime/lora.py)
    def weight_graph(self, component: str) -> str:
        """The ONNX variant the engine was parsed from: its initializer names are the engine's weight names."""
        entry = self.engine(component).entry
        return self.manifest.onnx(component, entry.get("variant", self.resolve(component).variant)).graph.path

    def set_weights(self, overrides) -> None:
        """Refit the components' engines in place with only the changed weights (runtime/backends/
        trt_refit.py); weights changed before and not now get their base values back from the ONNX file."""
        from k3trt.contract.errors import AdapterError
        from k3trt.runtime.backends.trt_refit import refit_named
        from k3trt.runtime.lora import read_initializers
        from k3trt.runtime.tensorrt_env import trt_logger

        applied = self.__dict__.setdefault("_applied", {})  # component -> names refit away from the base
        for component in sorted(set(applied) | {c for c, w in overrides.items() if w}):
            eng, graph = self.engine(component), self.weight_graph(component)
            if not eng.entry.get("flags", {}).get("refittable"):
                raise AdapterError(f"engine {eng.name!r} was not built refittable", accepted="refittable engines",
                                   fix=f"k3trt build --artifacts {self.manifest.root} --components {component} "
                                       "--refittable --force")
            new = dict(overrides.get(component, {}))
            restore = [n for n in applied.get(component, ()) if n not in new]
            base = lambda names, g=graph: read_initializers(self.manifest, g, list(names))  # noqa: E731
            new = {**new, **(base(restore) if restore else {})}  # not dict.update: the API check reads it as TRT's
            with self._device_api.activate():
                refit_named(self._trt, eng.engine, new, base, eng.name, trt_logger())
            for lane in self._lanes.drain():  # captured graphs are re-captured with the new weights
                lane.graphs.pop(eng.name, None)
                self._lanes.release(lane)
            applied[component] = set(overrides.get(component, {}))

    def close(self) -> None:
        for lane in self._lanes.drain():
            lane.graphs.clear()
            lane.contexts.clear()
            lane.memory = None
        self._engines.clear()
        self._runtime = None


def _check_weight_streaming(value) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
            c in COMPONENTS and isinstance(b, int) and not isinstance(b, bool) and b >= 1 for c, b in value.items()):
        raise InvalidArgumentError(f"weight_streaming={value!r}", accepted="a map component -> bytes of its weights "
                                   f"kept on the device (>= 1), components: {', '.join(COMPONENTS)}",
                                   fix='e.g. weight_streaming={"text_encoder": 8 << 30}')
    return dict(value)
