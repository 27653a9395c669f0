"""Reduced-precision storage, emulated faithfully on ONNX Runtime's CPU provider.

ONNX Runtime's CPU provider has few fp16 and almost no bf16 kernels. For fp16 it inserts Casts around the ops it
lacks and then removes the Cast pairs between neighbours, so chains of ops run in fp32 and an intermediate that
would overflow fp16 never does: fp16 overflow is hidden. For bf16 it refuses (no bf16 MatMul).

`emulate_storage` rewrites a mixed-precision graph so every op computes in fp32 (as GPU kernels accumulate) but
every tensor the variant stores in fp16/bf16 is rounded to that type right after it is produced, by a
Cast(to=fp16|bf16) -> Cast(to=fp32) pair (ONNX Runtime's CPU Cast supports both types). Run with graph
optimizations off, so no pass can fold the pairs away. The result overflows where the variant overflows and
rounds where it rounds; the ONNX reference evaluator (onnx.reference, numpy with fp16/bf16 arrays) is the
independent check of this on the tiny models (tests/export/test_exp_variants.py).

No library does this rewrite (converters go the other way), hence these ~80 lines.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

REDUCED = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


def _float_initializer(tensor: TensorProto) -> TensorProto:
    array = numpy_helper.to_array(tensor).astype("float32")  # exact: fp16/bf16 values are fp32 values
    return numpy_helper.from_array(array, tensor.name)


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _collect_types(graph: onnx.GraphProto, types: dict[str, int]) -> None:
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    for t in graph.initializer:
        types.setdefault(t.name, t.data_type)
    for node in graph.node:
        for sub in _subgraphs(node):  # If/Loop/Scan bodies (the U-Net's time-condition `If`)
            _collect_types(sub, types)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, subgraphs included (after type inference)."""
    types: dict[str, int] = {}
    _collect_types(onnx.shape_inference.infer_shapes(model, strict_mode=False).graph, types)
    return types


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Casts to fp16/bf16 become casts to fp32 (the rounding pair follows); fp16/bf16 constants become fp32."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i in REDUCED:
            attr.i = TensorProto.FLOAT
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in REDUCED:
            attr.t.CopyFrom(_float_initializer(attr.t))


def _rewrite(graph: onnx.GraphProto, types: dict[str, int], *, main: bool) -> int:
    """Rewrite one graph (and its subgraphs) in place; returns the number of rounded tensors."""
    for io in list(graph.input) + list(graph.output):
        if io.type.tensor_type.elem_type in REDUCED:
            if main:
                raise ValueError(f"graph I/O {io.name!r} is {REDUCED[io.type.tensor_type.elem_type]}; "
                                 "variants keep fp32 I/O")
            io.type.tensor_type.elem_type = TensorProto.FLOAT  # a subgraph's values are fp32 now (rounded)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in REDUCED:
            graph.initializer[index].CopyFrom(_float_initializer(tensor))
    nodes, rounded = [], 0
    for node in graph.node:
        _retype_attributes(node)
        for sub in _subgraphs(node):
            rounded += _rewrite(sub, types, main=False)
        renames = {}
        for i, name in enumerate(node.output):
            if name and types.get(name) in REDUCED:
                renames[name] = node.output[i] = f"{name}__fp32_before_rounding"
        nodes.append(node)
        for name, raw in renames.items():
            low = types[name]
            nodes.append(helper.make_node("Cast", [raw], [f"{name}__stored"], to=low,
                                          name=f"{name}__store_{REDUCED[low]}"))
            nodes.append(helper.make_node("Cast", [f"{name}__stored"], [name], to=TensorProto.FLOAT,
                                          name=f"{name}__load_{REDUCED[low]}"))
            rounded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale types; ONNX Runtime infers its own
    return rounded


def emulate_storage(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` that computes in fp32 and rounds every fp16/bf16 tensor to its type where it is made
    (in subgraphs too). Returns (model, number of rounded tensors). The main graph's inputs and outputs must be
    fp32 or integer (variants keep their I/O types)."""
    types = _tensor_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, _rewrite(out.graph, types, main=True)
