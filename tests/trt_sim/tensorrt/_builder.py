"""Builder, IBuilderConfig, IOptimizationProfile, ITimingCache of the stand-in.

Build rules and their sources:
- A network with a dynamic input needs an optimization profile that covers it, each profile's min <= opt <= max
  and its ranks/static dimensions matching the network (developer guide, "Optimization Profiles"; NvInfer.h,
  IOptimizationProfile::setDimensions). `add_optimization_profile` returns -1 for an invalid profile
  (NvInfer.h, IBuilderConfig::addOptimizationProfile: "the index ... or -1 if the input is not valid").
- Every (op, data type) pair must have an implementation (engines/parser_support.py, the table `k3trt check`
  reads): otherwise the build logs "Could not find any implementation for node ..." and returns None, which
  is what TensorRT does for a bf16 Resize (NVIDIA/TensorRT demo/Diffusion base_model.py, 11.1).
- TF32 is on by default in a new builder config (NvInfer.h, BuilderFlag::kTF32: "Enabled by default").
- Timing caches are tied to the TensorRT version and the device (developer guide, "Timing Cache": a cache is
  not valid across TensorRT versions or devices); `set_timing_cache(cache, ignore_mismatch=False)` refuses a
  cache from another device or version (NvInfer.h, IBuilderConfig::setTimingCache).
- A null Builder (driver too old for the CUDA the wheel was built with) is pybind11's TypeError "factory
  function returned nullptr" (shared/notes/tensorrt.md, first-contact facts).
"""
from __future__ import annotations

import json

import onnx

from . import _plan
from ._api import STATE, Api
from ._network import INetworkDefinition
from ._types import BuilderFlag, DeviceType, ENUMS, IHostMemory, log_error, onnx_to_trt

DEFAULT_FLAGS = ("TF32",)


class Builder(Api):
    _trt_name = "Builder"

    def __init__(self, logger):
        if not STATE.driver_ok:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self._logger = logger

    @property
    def logger(self):
        return self._logger

    @property
    def platform_has_fast_fp16(self) -> bool:  # 10.x only
        return True

    @property
    def platform_has_tf32(self) -> bool:  # 10.x only
        return STATE.compute_capability >= (8, 0)

    def create_network(self, flags: int = 0):
        return INetworkDefinition(self, flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        problems = _profile_problems(network, config) + _kernel_problems(network)
        STATE.builds.append({"flags": sorted(config._flags), "profiles": config._profile_shapes(),
                             "strongly_typed": network._strongly_typed, "problems": problems})
        if problems:
            for problem in problems:
                log_error(self._logger, problem)
            return None
        data = _onnx_bytes(network)
        if config._cache is not None:  # the tactics timed for this network (one entry per distinct network)
            import hashlib

            entry = hashlib.sha256(data).hexdigest()[:16]
            config._cache._data["entries"] = sorted(set(config._cache._data["entries"]) | {entry})
        return IHostMemory(_plan.pack(_header(network, config), data))


def _profile_problems(network, config) -> list[str]:
    dynamic = [t.name for t in network._inputs if -1 in t.shape]
    if dynamic and not config._profiles:
        return [f"Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no optimization "
                f"profile has been defined: {dynamic})"]
    out = []
    for index, profile in enumerate(config._profiles):
        for tensor in network._inputs:
            shapes = profile._shapes.get(tensor.name)
            if shapes is None:
                if -1 in tensor.shape:
                    out.append(f"Error Code 4: API Usage Error (optimization profile {index} has no shapes for "
                               f"dynamic input {tensor.name!r})")
                continue
            for shape in shapes:
                if len(shape) != len(tensor.shape) or any(n not in (-1, s) for n, s in zip(tensor.shape, shape)):
                    out.append(f"Error Code 4: API Usage Error (profile {index} shape {list(shape)} for "
                               f"{tensor.name!r} does not match the network's {list(tensor.shape)})")
                    break
    return out


def _kernel_problems(network) -> list[str]:
    from k3trt.engines.parser_support import type_problem

    out = []
    types = network._types
    for index, node in enumerate(network._model.graph.node):
        first_in = types.get(node.input[0]) if node.input and node.input[0] else None
        first_out = types.get(node.output[0]) if node.output else None
        problem = type_problem(node.op_type, first_in, first_out)
        if problem:
            out.append(f"Error Code 10: Internal Error (Could not find any implementation for node "
                       f"{node.name or f'node_{index}'}: {problem})")
    return out


def _onnx_bytes(network) -> bytes:
    return network._model.SerializeToString()  # external data was loaded at parse time: the plan is whole


def _header(network, config) -> dict:
    model = network._model
    io = [{"name": t.name, "mode": "INPUT", "dtype": t.dtype.name, "shape": list(t.shape),
           "onnx_type": v.type.tensor_type.elem_type}
          for t, v in zip(network._inputs, [v for v in model.graph.input if v.name in {i.name for i in network._inputs}])]
    io += [{"name": t.name, "mode": "OUTPUT", "dtype": t.dtype.name, "shape": list(t.shape),
            "onnx_type": v.type.tensor_type.elem_type} for t, v in zip(network._outputs, model.graph.output)]
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    weights = {t.name: [onnx_to_trt(t.data_type), list(t.dims)] for t in model.graph.initializer
               if t.data_type in floats} if "REFIT" in config._flags else {}
    return {"tensorrt": STATE.version, "compute_capability": list(STATE.compute_capability),
            "gpu_name": STATE.gpu_name, "flags": sorted(config._flags), "profiles": config._profile_shapes(),
            "strongly_typed": network._strongly_typed, "io": io, "weights": weights, "name": network.name,
            "builder_optimization_level": config._level}


class IOptimizationProfile(Api):
    _trt_name = "IOptimizationProfile"

    def __init__(self):
        self._shapes: dict[str, tuple] = {}
        self._valid = True

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 (the real parameter names)
        shapes = tuple(tuple(int(d) for d in s) for s in (min, opt, max))
        ranks = {len(s) for s in shapes}
        if len(ranks) != 1 or any(not a <= b <= c for a, b, c in zip(*shapes)):
            self._valid = False  # NvInfer.h setDimensions: min <= opt <= max per dimension, equal ranks
        self._shapes[input] = shapes

    def get_shape(self, input: str):  # noqa: A002
        from ._types import Dims

        return [Dims(s) for s in self._shapes.get(input, ((), (), ()))]


class ITimingCache(Api):
    _trt_name = "ITimingCache"

    def __init__(self, data: dict):
        self._data = data

    def serialize(self):
        return IHostMemory(json.dumps(self._data, sort_keys=True).encode())

    def combine(self, input_cache, ignore_mismatch: bool) -> bool:
        if not ignore_mismatch and input_cache._data["key"] != self._data["key"]:
            return False
        if input_cache._data["key"] == self._data["key"]:
            self._data["entries"] = sorted(set(self._data["entries"]) | set(input_cache._data["entries"]))
        return True

    def reset(self) -> bool:
        self._data["entries"] = []
        return True


def cache_key() -> list:
    return [STATE.version, list(STATE.compute_capability)]


class IBuilderConfig(Api):
    _trt_name = "IBuilderConfig"

    def __init__(self):
        self._flags = set(DEFAULT_FLAGS)
        self._profiles: list[IOptimizationProfile] = []
        self._pools: dict = {}
        self._cache: ITimingCache | None = None
        self._level = 3
        self._verbosity = ENUMS["ProfilingVerbosity"].LAYER_NAMES_ONLY
        self._tactic_sources = 0
        self._preview: set = set()

    # --- flags
    def set_flag(self, flag) -> None:
        self._flags.add(flag.name)

    def clear_flag(self, flag) -> None:
        self._flags.discard(flag.name)

    def get_flag(self, flag) -> bool:
        return flag.name in self._flags

    @property
    def flags(self) -> int:
        return sum(1 << int(getattr(BuilderFlag, n)) for n in self._flags)

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = {n for n, m in BuilderFlag.__members__.items() if value & (1 << int(m))}

    # --- profiles
    def add_optimization_profile(self, profile) -> int:
        if not profile._valid:
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def _profile_shapes(self) -> list[dict]:
        return [{name: [list(s) for s in shapes] for name, shapes in p._shapes.items()} for p in self._profiles]

    # --- memory, tactics, levels
    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        self._pools[pool.name] = int(pool_size)

    def get_memory_pool_limit(self, pool) -> int:
        return self._pools.get(pool.name, 0)

    def set_tactic_sources(self, tactic_sources: int) -> bool:
        self._tactic_sources = int(tactic_sources)
        return True

    def get_tactic_sources(self) -> int:
        return self._tactic_sources

    def set_preview_feature(self, feature, enable: bool) -> None:
        (self._preview.add if enable else self._preview.discard)(feature.name)

    def get_preview_feature(self, feature) -> bool:
        return feature.name in self._preview

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, value: int) -> None:
        self._level = int(value)

    @property
    def profiling_verbosity(self):
        return self._verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value) -> None:
        self._verbosity = value

    @property
    def DLA_core(self) -> int:  # noqa: N802 (the real name)
        return -1

    @property
    def default_device_type(self):
        return DeviceType.GPU

    @property
    def engine_capability(self):
        return ENUMS["EngineCapability"].STANDARD

    @property
    def int8_calibrator(self):  # 10.x only; implicit INT8 calibration is not simulated
        return None

    # --- timing cache
    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
        data = bytes(memoryview(serialized_timing_cache))
        if data:
            try:
                loaded = json.loads(data)
                if loaded.get("format") == "k3trt-sim-timing-cache":
                    return ITimingCache(loaded)
            except ValueError:
                pass
        return ITimingCache({"format": "k3trt-sim-timing-cache", "key": cache_key(), "entries": []})

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache._data["key"] != cache_key() and not ignore_mismatch:
            return False
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

