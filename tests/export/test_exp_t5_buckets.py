"""The bf16 (and fp16) text encoder computes T5's relative-position buckets in fp32, as transformers does."""
from __future__ import annotations

import onnx
import pytest

import torch

from k3trt.export.components import SPECS, model_info
from k3trt.export.fp32_islands import fp32_nodes, t5_position_bucket_nodes
from k3trt.export.onnx_export import export_onnx
from k3trt.export.precision_variants import convert
from k3trt.contract.cards import card


@pytest.fixture(scope="module")
def t5_fp32(tiny_source, tmp_path_factory):
    """The tiny preset's text encoder exported alone (its sequence axis dynamic, so the buckets are in-graph)."""
    spec = SPECS["text_encoder"]
    encoder = tiny_source.load(spec.folder).eval()
    feeds = spec.make_inputs({"batch": 1, "sequence": 12}, model_info(tiny_source, spec),
                             torch.Generator().manual_seed(5))
    graph, _ = export_onnx(spec, encoder, feeds, tmp_path_factory.mktemp("t5-buckets"))
    return graph


def _bucket_types(model: onnx.ModelProto) -> dict[str, set[int]]:
    """op type -> element types of the float tensors around each bucket node (Log, and its Div/Mul chain)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}
    found: dict[str, set[int]] = {}
    for name in t5_position_bucket_nodes(model):
        node = next(n for n in graph.node if n.name == name)
        tensors = list(node.output) if node.op_type == "Cast" else list(node.input[:1]) + list(node.output)
        found.setdefault(node.op_type, set()).update(types.get(t) for t in tensors if t in types)
    return found


def test_bucket_nodes_are_found_by_structure(t5_fp32):
    model = onnx.load(str(t5_fp32), load_external_data=False)
    names = t5_position_bucket_nodes(model)
    ops = [n.op_type for n in model.graph.node if n.name in names]
    assert sorted(ops) == sorted(["Cast", "Div", "Log", "Div", "Mul", "Cast"])  # one attention bias in the tiny T5
    for policy in ("t5_norms", "t5_norms_wo_residual"):
        assert set(names) <= set(fp32_nodes(policy, model))
    for i, node in enumerate(model.graph.node):  # renamed nodes still match
        node.name = f"n{i}"
    assert len(t5_position_bucket_nodes(model)) == 6


@pytest.mark.parametrize("precision", ["bf16"])
def test_reduced_t5_keeps_bucket_math_fp32(t5_fp32, precision):
    keep = fp32_nodes(card("text_encoder").precision.islands(precision), onnx.load(str(t5_fp32)))
    variant = convert(t5_fp32, precision, keep)
    types = _bucket_types(variant)
    assert types["Log"] == {onnx.TensorProto.FLOAT}, types
    assert types["Div"] == types["Mul"] == {onnx.TensorProto.FLOAT}, types
    reduced = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16}[precision]
    graph = onnx.shape_inference.infer_shapes(variant).graph
    value_types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.output[0] in value_types]
    assert any(value_types[n.output[0]] == reduced for n in matmuls)  # the rest did go to the reduced type
