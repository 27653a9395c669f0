"""Runtime, ICudaEngine, IExecutionContext: deserialize a stand-in plan and run it on bound host memory.

Rules, each from TensorRT's documented contract (NvInferRuntime.h = NVIDIA/TensorRT include/NvInferRuntime.h,
release 11.1; the developer guide sections are named as they are titled):
- A plan deserializes only under the TensorRT version that built it (developer guide, "Version
  Compatibility": engines are not portable across versions unless built version-compatible) and on the GPU
  model it was built for (developer guide, "Hardware Compatibility"); otherwise an error is logged and
  `deserialize_cuda_engine` returns None.
- `set_input_shape` returns False when the name is not an input, the rank differs, a dimension disagrees with a
  static network dimension (NvInferRuntime.h, setInputShape: "Each dimension must agree with the network
  dimension unless the latter was -1") or lies outside the active profile's min..max (developer guide,
  "Optimization Profiles": runtime dimensions must lie within the profile's bounds).
- `set_tensor_address` returns False for a name that is no I/O tensor, and for a pointer without 256-byte
  alignment (NvInferRuntime.h, setTensorAddress: "The pointer must have at least 256-byte alignment").
- `execute_async_v3` returns False (an error logged) unless every input has a shape and a non-null address and
  every output a non-null address (NvInferRuntime.h, setTensorAddress: "Before calling enqueueV3(), each input
  must have a non-null address and each output must have a non-null address"), and, for a context created
  USER_MANAGED, device memory was set (NvInferRuntime.h, ExecutionContextAllocationStrategy::kUSER_MANAGED).
- Weight streaming: `streamable_weights_size` is 0 unless the engine was built with WEIGHT_STREAMING;
  a budget set without it fails (NvInferRuntime.h, getStreamableWeightsSize / setWeightStreamingBudgetV2).
Sizes the stand-in reports (device memory, weights) are nominal byte counts of its ONNX, not TensorRT figures.
"""
from __future__ import annotations

import math

import numpy as np

from . import _plan
from ._api import STATE, Api
from ._execute import Executor, host_array, numpy_dtype
from ._types import DataType, Dims, ExecutionContextAllocationStrategy, IHostMemory, TensorIOMode, \
    TensorLocation, log_error, onnx_to_trt


class Runtime(Api):
    _trt_name = "Runtime"

    def __init__(self, logger):
        if not STATE.driver_ok:  # pybind11's message when the C++ factory returns nullptr (driver too old)
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self._logger = logger
        self._host_code = False

    @property
    def logger(self):
        return self._logger

    @property
    def engine_host_code_allowed(self) -> bool:
        return self._host_code

    @engine_host_code_allowed.setter
    def engine_host_code_allowed(self, value: bool) -> None:
        self._host_code = bool(value)

    def deserialize_cuda_engine(self, serialized_engine):
        """A buffer, or a stream reader (IStreamReader on 10, IStreamReaderV2 on 11, as Polygraphy's FileReader)."""
        data = _read_all(serialized_engine) if hasattr(serialized_engine, "read") else serialized_engine
        try:
            header, onnx_bytes = _plan.unpack(data)
        except _plan.PlanError as exc:
            log_error(self._logger, f"IRuntime::deserializeCudaEngine: Error Code 1: Serialization ({exc})")
            return None
        if header["tensorrt"] != STATE.version:
            log_error(self._logger, "IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine "
                      f"plan file is not compatible with this version of TensorRT, expecting library version "
                      f"{STATE.version} got {header['tensorrt']}, please rebuild.)")
            return None
        if tuple(header["compute_capability"]) != STATE.compute_capability:
            log_error(self._logger, "IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine "
                      f"plan file is generated on an incompatible device, expecting compute "
                      f"{'.'.join(map(str, STATE.compute_capability))} got compute "
                      f"{'.'.join(map(str, header['compute_capability']))}, please rebuild.)")
            return None
        return ICudaEngine(header, onnx_bytes, self._logger)


def _read_all(reader) -> bytes:
    chunks = []
    v2 = STATE.version.startswith("11")
    while True:
        chunk = reader.read(1 << 24, 0) if v2 else reader.read(1 << 24)
        if not chunk:
            return b"".join(chunks)
        chunks.append(bytes(chunk))


class ICudaEngine(Api):
    _trt_name = "ICudaEngine"

    def __init__(self, header: dict, onnx_bytes: bytes, logger):
        self._header, self._logger = header, logger
        self._io = header["io"]
        self._by_name = {t["name"]: t for t in self._io}
        self._executor = Executor(onnx_bytes)
        self._budget = self.streamable_weights_size
        self._contexts = 0

    # --- I/O
    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index]["name"] if 0 <= index < len(self._io) else None

    def _tensor(self, name: str) -> dict | None:
        return self._by_name.get(name)

    def get_tensor_mode(self, name: str):
        tensor = self._tensor(name)
        return TensorIOMode.NONE if tensor is None else getattr(TensorIOMode, tensor["mode"])

    def get_tensor_dtype(self, name: str):
        return getattr(DataType, self._by_name[name]["dtype"])

    def get_tensor_shape(self, name: str):
        return Dims(self._by_name[name]["shape"])

    def get_tensor_location(self, name: str):
        return TensorLocation.DEVICE

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        """[min, opt, max] of input `name` in profile `profile_index`."""
        shapes = self._header["profiles"][profile_index][name]
        return [Dims(s) for s in shapes]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._header["profiles"])

    @property
    def name(self) -> str:
        return self._header.get("name", "")

    @property
    def num_layers(self) -> int:
        return len(self._executor.model.graph.node)

    @property
    def refittable(self) -> bool:
        return "REFIT" in self._header["flags"]

    # --- memory
    def _activation_bytes(self) -> int:
        """Nominal: twice the I/O bytes at the profiles' largest shapes (no TensorRT figure)."""
        total = 0
        for tensor in self._io:
            shape = tensor["shape"]
            if tensor["mode"] == "INPUT" and -1 in shape:
                shape = max((p[tensor["name"]][2] for p in self._header["profiles"]), key=math.prod)
            total += math.prod(max(d, 1) for d in shape) * numpy_dtype(tensor["onnx_type"]).itemsize
        return -(-2 * total // 256) * 256

    @property
    def device_memory_size(self) -> int:  # 10.x; removed in 11 (the surface gates it)
        return self._activation_bytes()

    @property
    def device_memory_size_v2(self) -> int:
        return self._activation_bytes()

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        return self._activation_bytes()

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self._activation_bytes()

    @property
    def streamable_weights_size(self) -> int:
        """0 unless built with WEIGHT_STREAMING (NvInferRuntime.h, getStreamableWeightsSize)."""
        if "WEIGHT_STREAMING" not in self._header["flags"]:
            return 0
        from onnx import numpy_helper

        return int(sum(numpy_helper.to_array(t).nbytes for t in self._executor.model.graph.initializer))

    @property
    def weight_streaming_budget_v2(self) -> int:
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, budget: int) -> None:
        if "WEIGHT_STREAMING" not in self._header["flags"]:
            log_error(self._logger, "ICudaEngine::setWeightStreamingBudgetV2: Error Code 3: API Usage Error "
                      "(the engine was not built with BuilderFlag::kWEIGHT_STREAMING)")
            return
        if self._contexts:
            log_error(self._logger, "ICudaEngine::setWeightStreamingBudgetV2: Error Code 3: API Usage Error "
                      "(the budget cannot change while execution contexts exist)")
            return
        self._budget = max(0, min(int(budget), self.streamable_weights_size))

    def get_weight_streaming_automatic_budget(self) -> int:
        return self.streamable_weights_size

    # --- contexts and serialization
    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        self._contexts += 1
        return IExecutionContext(self, strategy)

    def create_execution_context_without_device_memory(self):  # 10.x only
        return self.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)

    def serialize(self):
        return IHostMemory(_plan.pack(self._header, self._executor.onnx_bytes))


class IExecutionContext(Api):
    _trt_name = "IExecutionContext"

    def __init__(self, engine: ICudaEngine, strategy):
        self._engine, self._strategy = engine, strategy
        self._shapes: dict[str, tuple] = {}
        self._addresses: dict[str, int] = {}
        self._device_memory = 0
        self._name = ""
        self._state_shapes = None  # the input shapes its internal (device-side) state was last updated for

    @property
    def engine(self) -> ICudaEngine:
        return self._engine

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def active_optimization_profile(self) -> int:
        return 0

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        return profile_index == 0

    def _error(self, message: str) -> bool:
        log_error(self._engine._logger, message)
        return False

    def set_input_shape(self, name: str, shape) -> bool:
        tensor = self._engine._tensor(name)
        if tensor is None or tensor["mode"] != "INPUT":
            return self._error(f"IExecutionContext::setInputShape: Error Code 3: API Usage Error ({name!r} is "
                               "not an input tensor)")
        shape = tuple(int(d) for d in shape)
        network = tensor["shape"]
        low, _, high = self._engine._header["profiles"][0][name]
        if len(shape) != len(network) or any(n not in (-1, s) for n, s in zip(network, shape)) or \
                any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            return self._error(f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Given invalid "
                               f"tensor dimensions {list(shape)} for {name!r}: the profile allows {low}..{high} "
                               f"and the network {network})")
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str):
        tensor = self._engine._tensor(name)
        if tensor is None:
            return Dims([-1])
        if tensor["mode"] == "INPUT":
            return Dims(self._shapes.get(name, tensor["shape"]))
        if not self.all_binding_shapes_specified:
            return Dims(tensor["shape"])
        return Dims(self._engine._executor.output_shapes(self._shapes)[name])

    @property
    def all_binding_shapes_specified(self) -> bool:
        return all(t["name"] in self._shapes for t in self._engine._io if t["mode"] == "INPUT")

    def infer_shapes(self) -> list:
        return [t["name"] for t in self._engine._io if t["mode"] == "INPUT" and t["name"] not in self._shapes]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self._engine._tensor(name) is None:
            return self._error(f"IExecutionContext::setTensorAddress: Error Code 3: API Usage Error ({name!r} "
                               "is not an input or output tensor)")
        if memory and int(memory) % STATE.alignment:
            return self._error(f"IExecutionContext::setTensorAddress: Error Code 3: API Usage Error (address "
                               f"{int(memory):#x} of {name!r} is not {STATE.alignment}-byte aligned)")
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    @property
    def device_memory(self) -> int:
        return self._device_memory

    @device_memory.setter
    def device_memory(self, memory: int) -> None:
        self._device_memory = int(memory)

    def set_device_memory(self, memory: int, size: int) -> None:
        if size < self._engine.device_memory_size_v2:
            log_error(self._engine._logger, f"IExecutionContext::setDeviceMemoryV2: Error Code 3: API Usage "
                      f"Error (size {size} < the engine's {self._engine.device_memory_size_v2} bytes)")
            return
        self._device_memory = int(memory)

    def update_device_memory_size_for_shapes(self) -> int:
        return self._engine.device_memory_size_v2

    def _snapshot(self) -> dict | None:
        """What an enqueue would run now, or None (an error logged) when the bindings are incomplete."""
        missing = self.infer_shapes()
        if missing:
            return self._error(f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (input shapes of "
                               f"{missing} are not specified)") or None
        unbound = [t["name"] for t in self._engine._io if not self._addresses.get(t["name"])]
        if unbound:
            return self._error(f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (tensors {unbound} "
                               "have no address: bind every input and output with setTensorAddress)") or None
        if self._strategy == ExecutionContextAllocationStrategy.USER_MANAGED and not self._device_memory:
            return self._error("IExecutionContext::enqueueV3: Error Code 3: API Usage Error (a USER_MANAGED "
                               "context has no device memory: call set_device_memory first)") or None
        outputs = self._engine._executor.output_shapes(self._shapes)
        return {"engine": self._engine, "context": self, "inputs": dict(self._shapes), "outputs": outputs,
                "addresses": dict(self._addresses), "captured": False}

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Run now, or record the launch when `stream_handle` is being captured into a graph (`_sim.capture`).

        Developer guide, "CUDA Graphs": call enqueueV3 once, uncaptured, after an input shape change, to update
        the context's internal state; only then capture. A captured launch reads that state when it replays."""
        snapshot = self._snapshot()
        if snapshot is None:
            return False
        if int(stream_handle) in STATE.capturing:
            if self._state_shapes != snapshot["inputs"]:
                return self._error("IExecutionContext::enqueueV3: Error Code 3: API Usage Error (the input "
                                   "shapes changed since the last enqueue: call enqueueV3 once after an input "
                                   "shape change, before capturing a CUDA graph)")
            STATE.capturing[int(stream_handle)].append({**snapshot, "captured": True})
            return True
        run_snapshot(snapshot)
        self._state_shapes = snapshot["inputs"]
        return True


def run_snapshot(snapshot: dict) -> None:
    """Run an engine on the addresses and shapes a launch was made with (what a CUDA graph replays).

    A replayed launch whose context has since been updated for other input shapes meets that other state, as
    captured kernels do on a GPU: its outputs are garbage (NaN here), not a silent right answer."""
    engine: ICudaEngine = snapshot["engine"]
    if snapshot["captured"] and snapshot["context"]._state_shapes != snapshot["inputs"]:
        for name, shape in snapshot["outputs"].items():
            dtype = numpy_dtype(engine._by_name[name]["onnx_type"])
            host_array(snapshot["addresses"][name], shape, dtype)[...] = \
                np.nan if np.issubdtype(dtype, np.floating) else 0
        return
    feeds = {}
    for name, shape in snapshot["inputs"].items():
        dtype = numpy_dtype(engine._by_name[name]["onnx_type"])
        feeds[name] = np.array(host_array(snapshot["addresses"][name], shape, dtype))
    for name, value in engine._executor.run(feeds).items():
        dtype = numpy_dtype(engine._by_name[name]["onnx_type"])
        host_array(snapshot["addresses"][name], snapshot["outputs"][name], dtype)[...] = value.astype(dtype)


__all__ = ["Runtime", "ICudaEngine", "IExecutionContext", "run_snapshot", "onnx_to_trt"]
