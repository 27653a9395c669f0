"""A TensorRT stand-in for tests (not shipped): `import tensorrt` under the `trt_sim` marker gets this module.

It offers a subset of the real Python API, each member gated by the real bindings' surface of the release it
impersonates (engines/api; 11.4 by default, 10.0.1 with `_sim.impersonate("10.0.1")`), and behaves by
TensorRT's documented contracts (each rule cites its source in the module that implements it):
- _network.py: ONNX parser (operator table of engines/parser_support.py), strongly typed networks;
- _builder.py: profiles, kernel availability per (op, type), TF32 default, timing caches, null Builder;
- _runtime.py: version/device compatibility of plans, set_input_shape / set_tensor_address / execute_async_v3
  rules, USER_MANAGED device memory, weight streaming;
- _refit.py: refit by weight name, missing weights.
An engine computes with ONNX Runtime on the host memory its tensors are bound to (torch CPU tensors'
`data_ptr()`), so numerics flow through; its serialized plan is self-contained (_plan.py).
`tensorrt._sim` is the test-side control panel (not TensorRT API): see tests/trt_sim/README.md.
"""
from __future__ import annotations

import sys
import types

from . import _sim  # noqa: F401  (the control panel; underscore: never part of the offered API)
from ._api import STATE, module_offers
from ._builder import Builder, IBuilderConfig, IOptimizationProfile, ITimingCache  # noqa: F401
from ._network import ILayer, INetworkDefinition, ITensor, OnnxParser  # noqa: F401
from ._refit import OnnxParserRefitter, Refitter  # noqa: F401
from ._runtime import ICudaEngine, IExecutionContext, Runtime  # noqa: F401
from ._types import ALIASES, ENUMS, Dims, IHostMemory, ILogger, IStreamReader, IStreamReaderV2, Logger, \
    Weights  # noqa: F401

globals().update(ENUMS)
globals().update(ALIASES)


def init_libnvinfer_plugins(logger, namespace: str) -> bool:
    return True  # no plugins are simulated; the project registers none


def get_nv_onnx_parser_version() -> int:
    major, minor = STATE.version.split(".")[:2]
    return int(major) * 100 + int(minor)


class _Module(types.ModuleType):
    """Module-level names gated like members: `trt.IInt8EntropyCalibrator2` is gone on 11, as it is there."""

    def __getattribute__(self, name):
        if name == "__version__":
            return STATE.version
        if name[:1] != "_" and not module_offers(name):
            raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (TensorRT {STATE.version})")
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Module
