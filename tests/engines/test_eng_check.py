"""`k3trt check`: the tiny artifacts pass; hand-built graphs with what TensorRT's parser rejects are named."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from k3trt.engines import check
from k3trt.engines.check import check_artifacts, check_onnx_file, lint_model, parse_trt_version
from k3trt.cli.main import main
from k3trt.contract.errors import InvalidArgumentError


def model_of(nodes, inputs, outputs, initializers=(), opset=19, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))


def vec(name, dtype=TensorProto.FLOAT, shape=("n",)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def codes(findings, severity="error"):
    return {(f.code, f.node, f.op_type) for f in findings if f.severity == severity}


def test_tiny_artifacts_pass(tiny_artifacts, capsys):
    results = check_artifacts(tiny_artifacts)
    assert {r.label for r in results} == {"text_encoder/fp32", "unet/fp32", "movq_decoder/fp32", "movq_encoder/fp32",
                                          "unet_inpainting/fp32", "unet_flash/fp32"}
    assert all(r.findings == () and r.nodes > 100 for r in results)
    assert main(["check", "--artifacts", str(tiny_artifacts)]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_unique_is_named_and_fails_the_command(tmp_path, capsys):
    # Unique: 'N' in onnx-tensorrt docs/operators.md for every release, TensorRT 10 included.
    model = model_of([helper.make_node("Relu", ["x"], ["r"], name="relu0"),
                      helper.make_node("Unique", ["r"], ["y"], name="dedupe_tokens")], [vec("x")], [vec("y")])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    assert main(["check", "--onnx", str(path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR   [unsupported-op] Unique 'dedupe_tokens'" in out and "1 error(s)" in out
    assert "relu0" not in out


def test_custom_domain_unknown_and_version_gated_ops():
    nodes = [helper.make_node("FusedGelu", ["x"], ["a"], name="ms_gelu", domain="com.microsoft"),
             helper.make_node("Swish", ["a"], ["b"], name="swish"),
             helper.make_node("LayerNormalization", ["b", "s"], ["y"], name="ln")]
    model = model_of(nodes, [vec("x")], [vec("y")], [numpy_helper.from_array(np.ones(1, np.float32), "s")])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    at_10 = lint_model(model)
    assert codes(at_10) == {("custom-op", "ms_gelu", "FusedGelu")}
    assert codes(at_10, "warning") == {("unknown-op", "swish", "Swish")}
    assert ("unsupported-op", "ln", "LayerNormalization") in codes(lint_model(model, trt_version=(8, 5)))


def test_local_functions_are_not_custom_ops():
    body = helper.make_function("my.fn", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                                [helper.make_opsetid("", 19)])
    model = model_of([helper.make_node("Twice", ["x"], ["y"], name="t", domain="my.fn")], [vec("x")], [vec("y")],
                     functions=[body])
    model.opset_import.append(helper.make_opsetid("my.fn", 1))
    assert lint_model(model) == []


def test_unsupported_attributes():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up", mode="cubic"),
             helper.make_node("MaxPool", ["r"], ["p", "idx"], name="pool", kernel_shape=[2, 2]),
             helper.make_node("ScatterND", ["p", "i", "u"], ["y"], name="scat", reduction="add")]
    model = model_of(nodes, [vec("x", shape=(1, 1, 4, 4)), vec("i", TensorProto.INT64, (1, 4)), vec("u", shape=(1,))],
                     [vec("y", shape=(1, 1, 4, 4))], [scales])
    found = codes(lint_model(model))
    assert {("unsupported-attribute", "up", "Resize"), ("unsupported-attribute", "pool", "MaxPool"),
            ("unsupported-attribute", "scat", "ScatterND")} <= found


def test_dynamic_constant_inputs_depend_on_the_version():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Slice", ["s", "zero", "one"], ["ax"], name="first_dim"),
             helper.make_node("Unsqueeze", ["x", "ax"], ["y"], name="unsq")]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    model = model_of(nodes, [vec("x")], [vec("y", shape=("a", "b"))], inits)
    assert ("dynamic-constant-input", "unsq", "Unsqueeze") in codes(lint_model(model, trt_version=(10, 0)))
    assert lint_model(model, trt_version=(10, 7)) == []


def test_dynamic_shape_problems_and_int64(tmp_path):
    unnamed = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    no_shape = helper.make_tensor_value_info("m", TensorProto.FLOAT, None)  # rank unknown
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])
    nodes = [helper.make_node("Add", ["x", "m"], ["y"], name="add"),
             helper.make_node("Gather", ["table", "big"], ["g"], name="lookup"),
             helper.make_node("Cast", ["ids"], ["z"], name="to_u16", to=TensorProto.UINT16)]
    inits = [numpy_helper.from_array(np.ones((4, 2), np.float32), "table"),
             numpy_helper.from_array(np.array([2**40], np.int64), "big")]
    model = model_of(nodes, [unnamed, no_shape, ids], [vec("y"), vec("g"), vec("z")], inits)
    at_10 = codes(lint_model(model, axes={"batch": (1, 8)}))
    assert {("unnamed-dynamic-dim", "x", "graph input"), ("unknown-rank", "m", "graph input"),
            ("unsupported-type", "to_u16", "Cast")} <= at_10
    assert ("unknown-axis", "ids", "graph input") in codes(lint_model(model, axes={"batch": (1, 8)}), "warning")
    at_8 = codes(lint_model(model, trt_version=(8, 6)))
    assert {("int64-io", "ids", "graph input"), ("int64-range", "big", "initializer")} <= at_8
    assert not {c for c in at_10 if c[0].startswith("int64")}


def _weighted():
    weight = numpy_helper.from_array(np.ones(4096, np.float32), "w")
    return model_of([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [vec("x", shape=(4096,))],
                    [vec("y", shape=(4096,))], [weight])


def test_external_data_outside_the_folder_missing_and_protobuf_limit(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(_weighted(), str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert check_onnx_file(folder / "model.onnx").findings == ()
    loaded = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for entry in loaded.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    onnx.save(loaded, str(folder / "evil.onnx"))
    assert ("external-data-path", "w", "initializer") in codes(check_onnx_file(folder / "evil.onnx").findings)
    (folder / "model.onnx.data").rename(folder / "moved.data")
    assert ("external-data-missing", "w", "initializer") in codes(check_onnx_file(folder / "model.onnx").findings)
    inline = tmp_path / "inline.onnx"
    onnx.save(_weighted(), str(inline))
    monkeypatch.setattr(check, "PROTOBUF_LIMIT", 1000)
    assert ("protobuf-limit", "(model)", "model") in codes(check_onnx_file(inline).findings)


def test_parse_trt_version():
    assert parse_trt_version(None) == (10, 0)
    assert parse_trt_version("10.3.0.26") == (10, 3)
    assert parse_trt_version("8") == (8, 0)
    with pytest.raises(InvalidArgumentError, match="--trt-version"):
        parse_trt_version("7.2")


def test_subgraph_nodes_are_checked():
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="u")], "then", [], [vec("y")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"], name="i")], "else", [], [vec("z")])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = model_of([helper.make_node("If", ["c"], ["out"], name="branch", then_branch=then, else_branch=other)],
                     [cond, vec("x")], [vec("out")])
    assert codes(lint_model(model)) == {("unsupported-op", "branch/then_branch/u", "Unique")}


def test_opset_range_follows_the_tensorrt_release():
    # The bf16 U-Net and MoVQ variants are opset 22 (ONNX accepts bfloat16 Conv from 22): documented from 10.6.
    model = model_of([helper.make_node("Relu", ["x"], ["y"], name="r")], [vec("x")], [vec("y")], opset=22)
    at_10_0 = [f for f in lint_model(model, trt_version=(10, 0)) if f.code == "opset"]
    assert [f.severity for f in at_10_0] == ["warning"]
    assert "documents opsets 9..20" in at_10_0[0].message and "--trt-version 10.6" in at_10_0[0].message
    assert lint_model(model, trt_version=(10, 6)) == [] and lint_model(model, trt_version=(11, 4)) == []
    assert check.max_opset((10, 5)) == 20 and check.max_opset((10, 15)) == 24 and check.max_opset((11, 5)) == 25
    assert check.max_opset((8, 6)) == 20  # older than the table: its oldest row (still a warning past it)
    too_new = model_of([helper.make_node("Relu", ["x"], ["y"], name="r")], [vec("x")], [vec("y")], opset=26)
    assert "no supported TensorRT release documents it" in lint_model(too_new, trt_version=(11, 5))[0].message
    ancient = model_of([helper.make_node("Relu", ["x"], ["y"], name="r")], [vec("x")], [vec("y")], opset=8)
    assert codes(lint_model(ancient)) == {("opset", "(model)", "opset")}
