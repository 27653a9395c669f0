"""Refitter and OnnxParserRefitter of the stand-in: new weights into a REFIT engine, by weight name.

Rules (NvInferRuntime.h, class IRefitter, release 11.1; developer guide, "Refitting an Engine"):
- Refittable weights are named after the ONNX initializers the parser made them from; the stand-in offers
  every floating-point initializer of a REFIT-built engine, with its ONNX type and element count as prototype.
- `set_named_weights` returns False for an unknown name or a type or count that differs from the prototype.
- `get_missing_weights`: weights combined with set ones (the stand-in: the other weights of the same ONNX node,
  e.g. a Conv's bias once its kernel is set) that were not supplied; `refit_cuda_engine` returns False while any
  are missing.
- A Refitter on an engine built without REFIT is a null factory result (TypeError in Python).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ._api import Api
from ._execute import Executor, host_array, numpy_dtype
from ._types import ONNX_TO_TRT, DataType, TensorLocation, Weights, log_error

TRT_TO_ONNX = {v: k for k, v in ONNX_TO_TRT.items()}


class Refitter(Api):
    _trt_name = "Refitter"

    def __init__(self, engine, logger):
        if not engine.refittable:
            log_error(logger, "IRefitter: Error Code 3: API Usage Error (the engine was not built refittable)")
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self._engine, self._logger = engine, logger
        self._weights = engine._header["weights"]  # name -> [DataType name, dims]
        self._pending: dict[str, np.ndarray] = {}

    @property
    def logger(self):
        return self._logger

    def get_all_weights(self) -> list:
        return sorted(self._weights)

    def get_weights_prototype(self, weights_name: str):
        dtype, dims = self._weights[weights_name]
        return Weights(getattr(DataType, dtype), 0, int(np.prod(dims, dtype=np.int64)))

    def get_weights_location(self, weights_name: str):
        return TensorLocation.HOST

    def set_named_weights(self, name: str, weights, location=TensorLocation.HOST) -> bool:
        if name not in self._weights:
            log_error(self._logger, f"IRefitter::setNamedWeights: Error Code 3: API Usage Error ({name!r} is not "
                      "a refittable weight of this engine)")
            return False
        prototype = self.get_weights_prototype(name)
        if weights.dtype != prototype.dtype or weights.size != prototype.size:
            log_error(self._logger, f"IRefitter::setNamedWeights: Error Code 3: API Usage Error ({name!r}: got "
                      f"{weights.dtype.name} x {weights.size}, the engine has {prototype.dtype.name} x "
                      f"{prototype.size})")
            return False
        dims = tuple(self._weights[name][1])
        values = host_array(weights._ptr, dims, numpy_dtype(TRT_TO_ONNX[weights.dtype.name]))
        self._pending[name] = np.array(values)  # read now; the caller may release its memory after refit
        return True

    def get_missing_weights(self) -> list:
        combined = set()
        for node in self._engine._executor.model.graph.node:
            names = [n for n in node.input if n in self._weights]
            if any(n in self._pending for n in names):
                combined |= {n for n in names if n not in self._pending}
        return sorted(combined)

    def refit_cuda_engine(self) -> bool:
        missing = self.get_missing_weights()
        if missing:
            log_error(self._logger, f"IRefitter::refitCudaEngine: Error Code 3: API Usage Error (missing weights: "
                      f"{missing})")
            return False
        model = self._engine._executor.model
        for tensor in model.graph.initializer:
            if tensor.name in self._pending:
                tensor.CopyFrom(numpy_helper.from_array(self._pending[tensor.name], tensor.name))
        self._engine._executor = Executor(model.SerializeToString())
        self._pending.clear()
        return True


class OnnxParserRefitter(Api):
    """Sets every engine weight from the ONNX initializer of the same name (NvOnnxParser.h, IParserRefitter)."""

    _trt_name = "OnnxParserRefitter"

    def __init__(self, refitter, logger):
        self._refitter, self._logger = refitter, logger
        self._errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int):
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def refit_from_file(self, model: str) -> bool:
        return self._refit(onnx.load(str(model), load_external_data=True))

    def refit_from_bytes(self, model, path=None) -> bool:
        proto = onnx.load_from_string(bytes(model))
        if path:
            from pathlib import Path

            onnx.external_data_helper.load_external_data_for_model(proto, str(Path(path).parent))
        return self._refit(proto)

    def _refit(self, proto) -> bool:
        refitter = self._refitter
        for tensor in proto.graph.initializer:
            if tensor.name not in refitter._weights:
                continue
            values = numpy_helper.to_array(tensor).copy()  # C order; keeps 0-d scalars 0-d
            dtype, dims = refitter._weights[tensor.name]
            if ONNX_TO_TRT.get(tensor.data_type) != dtype or list(values.shape) != list(dims):
                self._errors.append(f"initializer {tensor.name!r}: {values.dtype}{list(values.shape)} does not "
                                    f"match the engine's {dtype}{dims}")
                continue
            refitter._pending[tensor.name] = values
        return not self._errors
