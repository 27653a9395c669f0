"""FLOPs of one exported component call at concrete input shapes, counted from its ONNX graph.

Counted once per (graph, shapes): the graph is read without its weights, its inputs are fixed to the request's
shapes and ONNX shape inference propagates them. Every Conv, ConvTranspose, MatMul and Gemm counts 2 x MACs,
attention's activation x activation MatMuls (Q.K^T, P.V) included, which torch's FLOP counter misses on a CPU
(its SDPA kernel has no formula there). Norms, softmax and element-wise ops are not counted: they are a few
percent of the arithmetic and bound by memory, not by the GEMM peak the result is compared with.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclasses.dataclass(frozen=True)
class FlopCount:
    flops: float  # 2 x multiply-accumulates of the counted ops
    by_op: dict  # op type -> flops
    uncounted_nodes: tuple[str, ...]  # counted-type nodes whose shapes inference could not resolve

    @property
    def gflop(self) -> float:
        return self.flops / 1e9


def _fixed_inputs(model, shapes: Mapping[str, tuple]) -> None:
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name]):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)


def _known_shapes(model) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    return shapes


def _attr(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return attr.i if attr.type == attr.INT else list(attr.ints)
    return default


def node_flops(node, shapes: dict) -> float | None:
    """2 x MACs of one node, or None when a needed shape is unknown."""
    ins = [shapes.get(name) for name in node.input[:2]]
    out = shapes.get(node.output[0])
    if node.op_type == "Conv":
        if out is None or ins[1] is None:
            return None
        weight = ins[1]  # (Cout, Cin/groups, k...)
        return 2.0 * math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        if ins[0] is None or ins[1] is None:
            return None
        weight = ins[1]  # (Cin, Cout/groups, k...): every input pixel scatters into Cout/groups x k outputs
        return 2.0 * math.prod(ins[0]) * math.prod(weight[1:])
    if node.op_type == "MatMul":
        if out is None or ins[0] is None:
            return None
        return 2.0 * math.prod(out) * ins[0][-1]
    if node.op_type == "Gemm":
        if out is None or ins[0] is None:
            return None
        k = ins[0][0] if _attr(node, "transA", 0) else ins[0][-1]
        return 2.0 * math.prod(out) * k
    return 0.0


def _inferred(model, shapes: Mapping[str, tuple]):
    """`model` with its inputs fixed and shapes propagated: ONNX's own inference first; where it leaves counted
    nodes unresolved (T5's attention: a Softmax over a data-dependent position bias), ONNX Runtime's symbolic
    shape inference, which evaluates the shape arithmetic."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())  # private copy: inputs are rewritten
    del model.graph.value_info[:]
    _fixed_inputs(model, shapes)
    first = onnx.shape_inference.infer_shapes(model, data_prop=True)
    if not _missing(first):
        return first
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        second = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op it does not know: keep what ONNX resolved, the gaps are reported
        return first
    return second if len(_missing(second)) < len(_missing(first)) else first


def _missing(model) -> list[str]:
    known = _known_shapes(model)
    return [n.name or n.output[0] for n in _all_nodes(model.graph)
            if n.op_type in COUNTED_OPS and node_flops(n, known) is None]


def count_model(model, shapes: Mapping[str, tuple]) -> FlopCount:
    """FLOPs of `model` (an onnx.ModelProto, weights not needed) with its inputs fixed to `shapes`."""
    model = _inferred(model, shapes)
    known = _known_shapes(model)
    total, by_op, missing = 0.0, {}, []
    for node in _all_nodes(model.graph):
        if node.op_type not in COUNTED_OPS:
            continue
        flops = node_flops(node, known)
        if flops is None:
            missing.append(node.name or node.output[0])
            continue
        total += flops
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + flops
    return FlopCount(total, by_op, tuple(missing))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop bodies
            if attr.type == attr.GRAPH:
                yield from _all_nodes(attr.g)


def count_file(path: str | Path, shapes: Mapping[str, tuple]) -> FlopCount:
    """As `count_model`, reading only the graph (external weights stay on disk)."""
    import onnx

    return count_model(onnx.load(str(path), load_external_data=False), shapes)
