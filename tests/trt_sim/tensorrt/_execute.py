"""How a stand-in engine computes: its ONNX on ONNX Runtime (CPU), reading and writing the bound host memory.

Addresses are host pointers (torch CPU tensors' `data_ptr()`); the bytes are viewed with ctypes/numpy, so
whatever the caller bound is what the engine reads and writes, as device pointers are for a real engine.
fp16/bf16 graphs run with their storage emulated (k3trt.runtime.backends.ort.storage_session: ONNX Runtime's CPU provider
has no bf16 MatMul/Conv kernels), everything else as ONNX Runtime runs it.
"""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import onnx

REDUCED = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def numpy_dtype(onnx_type: int):
    if onnx_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def host_array(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A writable numpy view of `prod(shape)` elements at host address `address`."""
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Executor:
    """One ONNX model, its ONNX Runtime session (made on first use) and its output-shape rule."""

    def __init__(self, onnx_bytes: bytes):
        self.onnx_bytes = onnx_bytes
        self.model = onnx.load_from_string(onnx_bytes)
        self.inputs = {v.name: v for v in self.model.graph.input}
        self.outputs = {v.name: v for v in self.model.graph.output}
        self._session = None

    @functools.cached_property
    def reduced(self) -> bool:
        types = {t.data_type for t in self.model.graph.initializer}
        for node in self.model.graph.node:
            for attr in node.attribute:
                if attr.name == "to":
                    types.add(attr.i)
        return bool(types & REDUCED)

    def session(self):
        if self._session is None:
            from k3trt.runtime.backends.ort import cpu_session, storage_session

            self._session = (storage_session(self.model, threads=1) if self.reduced
                             else cpu_session(self.onnx_bytes, threads=1))
        return self._session

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Output shapes for concrete input shapes: named axes first, ONNX shape inference for the rest."""
        return dict(_output_shapes(self.onnx_bytes, tuple(sorted(input_shapes.items()))))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.outputs)
        return dict(zip(names, self.session().run(names, feeds)))


@functools.lru_cache(maxsize=64)
def _output_shapes(onnx_bytes: bytes, input_shapes: tuple) -> tuple:
    model = onnx.load_from_string(onnx_bytes)
    shapes = dict(input_shapes)
    axes = {}
    for value in model.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes.get(value.name, ())):
            if dim.dim_param:
                axes[dim.dim_param] = size
    out, unresolved = {}, False
    for value in model.graph.output:
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            dims.append(dim.dim_value if dim.dim_value > 0 else axes.get(dim.dim_param, -1))
        out[value.name] = tuple(dims)
        unresolved |= -1 in dims
    if unresolved:
        out.update(_inferred(model, shapes))
    return tuple(out.items())


def _inferred(model, shapes) -> dict:
    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(model)
    for value in graph_only.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            dim.Clear()
            dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(graph_only, data_prop=True).graph
    out = {}
    for value in inferred.output:
        out[value.name] = tuple(d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim)
    return out
