"""One operator/type table (engines/parser_support.py) behind `k3trt check` and the TensorRT stand-in.

A bf16 Resize is what TensorRT's parser accepts and its builder cannot run: `k3trt check` rejects it naming the
node and the fix; the bf16 export keeps Resize fp32 by the same table."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from k3trt.engines import parser_support
from k3trt.engines.check import check_onnx_file, lint_model
from k3trt.export.precision_variants import FP32_ONLY_OPS


def resize_model(data_type: int, *, cast_around: bool = False) -> onnx.ModelProto:
    """x (fp32) -> Cast(data_type) -> Resize (2x nearest) -> Cast(fp32) -> y; with `cast_around`, the Resize runs in
    fp32 between two extra casts, as the bf16 export makes it."""
    nodes = [helper.make_node("Cast", ["x"], ["x_low"], to=data_type, name="to_low")]
    resize_in, resize_out = "x_low", "r_low"
    if cast_around:
        nodes.append(helper.make_node("Cast", ["x_low"], ["x_f32"], to=TensorProto.FLOAT, name="resize_in_cast"))
        resize_in, resize_out = "x_f32", "r_f32"
    nodes.append(helper.make_node("Resize", [resize_in, "", "scales"], [resize_out], mode="nearest",
                                  name="/decoder/up.0/upsample/Resize"))
    if cast_around:
        nodes.append(helper.make_node("Cast", ["r_f32"], ["r_low"], to=data_type, name="resize_out_cast"))
    nodes.append(helper.make_node("Cast", ["r_low"], ["y"], to=TensorProto.FLOAT, name="to_fp32"))
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], [scales])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])


def test_check_rejects_a_bf16_resize_naming_the_node_and_the_fix():
    findings = [f for f in lint_model(resize_model(TensorProto.BFLOAT16), trt_version=(11, 4))
                if f.severity == "error"]
    assert [(f.code, f.node, f.op_type) for f in findings] == \
        [("unsupported-type-for-op", "/decoder/up.0/upsample/Resize", "Resize")]
    assert "no BF16 Resize implementation" in findings[0].message and "cast its data input to fp32" in \
        findings[0].message and "--precision bf16" in findings[0].message


@pytest.mark.parametrize("data_type", [TensorProto.FLOAT16, TensorProto.FLOAT])
def test_fp16_and_fp32_resizes_pass(data_type):
    assert not [f for f in lint_model(resize_model(data_type)) if f.code == "unsupported-type-for-op"]


def test_a_resize_kept_fp32_between_casts_passes(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(resize_model(TensorProto.BFLOAT16, cast_around=True), path)
    assert check_onnx_file(path, trt_version=(11, 4)).errors == []


def test_types_outside_the_operator_table_are_rejected():
    assert "not among the types" in parser_support.type_problem("MatMul", TensorProto.INT32, TensorProto.INT32)
    assert parser_support.type_problem("DequantizeLinear", TensorProto.INT8, TensorProto.FLOAT) is None
    assert parser_support.type_problem("ConstantOfShape", TensorProto.INT64, TensorProto.FLOAT) is None
    assert parser_support.type_problem("SomeUnknownOp", TensorProto.BFLOAT16, None) is None  # not judged


def test_the_export_keeps_fp32_exactly_the_ops_the_table_has_no_kernel_for():
    """export/variants.py may not import engines/ (stage order), so it names the ops itself: kept equal here."""
    for precision, name in (("fp16", "FP16"), ("bf16", "BF16")):
        table = sorted(op for op, type_name in parser_support.BUILDER_HAS_NO_KERNEL if type_name == name)
        assert sorted(FP32_ONLY_OPS[precision]) == table


def test_k3trt_check_exits_1_on_a_bf16_resize(tmp_path, capsys):
    from k3trt.cli.main import main

    path = tmp_path / "model.onnx"
    onnx.save(resize_model(TensorProto.BFLOAT16), path)
    assert main(["check", "--onnx", str(path), "--trt-version", "11.4"]) == 1
    out = capsys.readouterr().out
    assert "[unsupported-type-for-op] Resize '/decoder/up.0/upsample/Resize'" in out and "1 error(s)" in out
