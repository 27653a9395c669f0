"""Precision variants (issue 8): fp16/bf16 ONNX made from the fp32 export, with the card's fp32 islands, verified
with their reduced-precision storage kept (the ONNX reference evaluator and the storage-emulating ORT session)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from k3trt.export.components import SPECS, model_info
from k3trt.export.fp32_islands import fp32_nodes
from k3trt.export.onnx_export import export_onnx
from k3trt.export.precision_variants import (add_variants, check_variant_allowed, convert, parse_precisions, remove_dead_nodes,
                                   variant_opset)
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.ort import storage_session
from k3trt.runtime.backends.storage import emulate_storage
from k3trt.contract.cards import card
from k3trt.contract.errors import ArtifactError, InvalidArgumentError, ValidationError
from k3trt.contract.tensor_metrics import compare

from export_helpers import quiet, snapshot

FP16_MAX = float(np.finfo(np.float16).max)


def reference_eval(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """numpy with fp16/bf16 arrays: every tensor is stored in its ONNX type (no hidden fp32)."""
    return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0], dtype=np.float32)


# ----------------------------------------------------------------------------------------- T5 overflow
@pytest.fixture(scope="module")
def overflowing_t5(tiny_source, tmp_path_factory):
    """The tiny T5 with one FFN output projection `wo` scaled so the fp32 residual stream passes 65504."""
    spec = SPECS["text_encoder"]
    encoder = tiny_source.load(spec.folder).eval()
    info = model_info(tiny_source, spec)
    feeds = spec.make_inputs({"batch": 2, "sequence": 12}, info, torch.Generator().manual_seed(11))
    wo = encoder.encoder.block[0].layer[1].DenseReluDense.wo
    seen = {}
    hook = wo.register_forward_hook(lambda _m, _i, out: seen.__setitem__("wo", float(out.abs().max())))
    with torch.no_grad():
        spec.wrapper(encoder)(feeds["input_ids"], feeds["attention_mask"])
        wo.weight.mul_(4 * FP16_MAX / seen["wo"])  # the residual Add after it now holds ~4 x 65504
        hidden = {}
        residual = encoder.encoder.block[1].layer[0].layer_norm.register_forward_pre_hook(
            lambda _m, args: hidden.__setitem__("max", float(args[0].abs().max())))
        expected = spec.wrapper(encoder)(feeds["input_ids"], feeds["attention_mask"]).numpy()
        residual.remove()
    hook.remove()
    assert hidden["max"] > FP16_MAX and np.isfinite(expected).all()
    graph, _ = export_onnx(spec, encoder, feeds, tmp_path_factory.mktemp("t5-overflow"))
    return graph, {k: v.numpy() for k, v in feeds.items()}, expected


def test_naive_fp16_t5_overflows_and_the_policy_variant_does_not(overflowing_t5):
    graph, feeds, expected = overflowing_t5
    naive = convert(graph, "fp16", ())
    assert not np.isfinite(reference_eval(naive, feeds)).all()  # the policy matters
    assert not np.isfinite(storage_session(naive).run(None, feeds)[0]).all()
    keep = fp32_nodes(card("text_encoder").precision.islands("fp16"), onnx.load(str(graph)))
    policy = convert(graph, "fp16", keep)
    for got in (reference_eval(policy, feeds), storage_session(policy).run(None, feeds)[0]):
        metrics = compare(expected, got)
        assert metrics.finite and metrics.rel_l2 <= 5e-2, metrics


# ----------------------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def variant_artifacts(tiny_artifacts, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("variants") / "art"
    shutil.copytree(tiny_artifacts, root)
    made = add_variants(root, ["text_encoder", "movq_decoder"], ["fp16"], log=quiet)
    assert made == ["text_encoder.fp16", "movq_decoder.fp16"]
    return root


def test_variant_records_and_files(variant_artifacts):
    manifest = Manifest.load(variant_artifacts)
    for component in ("text_encoder", "movq_decoder"):
        fp32, fp16 = manifest.onnx(component), manifest.onnx(component, "fp16")
        assert (fp16.inputs, fp16.outputs, fp16.axes) == (fp32.inputs, fp32.outputs, fp32.axes)
        assert fp16.extra["source"] == f"onnx.{component}.fp32"
        assert fp16.extra["fp32_export_key"] == fp32.export_key
        manifest.verify_onnx(fp16)
        model = onnx.load(str(manifest.path(fp16.graph.path)))
        onnx.checker.check_model(model, full_check=True)
        kept = fp16.extra["fp32_nodes"]
        assert kept and set(kept) <= {n.name for n in model.graph.node}
        floats = {i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)}
        assert onnx.TensorProto.FLOAT16 not in floats  # I/O types stay as the fp32 export's
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        assert all(c["ok"] for c in fp16.validation["cases"])
        assert {c["evaluator"] for c in fp16.validation["cases"]} == {"ort", "storage"}


def test_movq_islands_stay_fp32_in_the_graph(variant_artifacts):
    manifest = Manifest.load(variant_artifacts)
    record = manifest.onnx("movq_decoder", "fp16")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(manifest.path(record.graph.path))))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    kept = set(record.extra["fp32_nodes"])
    for node in model.graph.node:
        if node.op_type in ("Softmax", "InstanceNormalization") and node.output[0] in types:
            assert node.name in kept and types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == "Conv" and node.output[0] in types:
            assert types[node.output[0]] == onnx.TensorProto.FLOAT16, node.name


def test_reference_evaluator_confirms_the_tiny_variants(variant_artifacts):
    from k3trt.export.precision_variants import verification_inputs

    manifest = Manifest.load(variant_artifacts)
    for component in ("text_encoder", "movq_decoder"):
        _, feeds = verification_inputs(component, manifest.onnx(component).extra["model_info"])
        fp32 = reference_eval(onnx.load(str(manifest.path(manifest.onnx(component).graph.path))), feeds)
        variant = onnx.load(str(manifest.path(manifest.onnx(component, "fp16").graph.path)))
        faithful, emulated = reference_eval(variant, feeds), storage_session(variant).run(None, feeds)[0]
        bounds = card(component).parity_tolerance("fp16").bounds()
        assert compare(fp32, faithful).within(**bounds) and compare(fp32, emulated).within(**bounds), component
        # two fp16-storage evaluators, different accumulation orders (numpy's fp16 Conv vs fp32-accumulating ORT)
        assert compare(faithful, emulated).rel_l2 < 1e-2, component


def test_variants_are_up_to_date_and_stale_ones_refused(variant_artifacts, tmp_path):
    import shutil

    from k3trt.runtime.backends.ort import OrtBackend

    assert add_variants(variant_artifacts, ["text_encoder"], ["fp16"], log=quiet) == []
    root = tmp_path / "stale"
    shutil.copytree(variant_artifacts, root)
    data = json.loads((root / "manifest.json").read_text())
    data["onnx"]["movq_decoder"]["fp32"]["export_key"] = "re-exported"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="derived from an earlier fp32 export"):
        OrtBackend(Manifest.load(root), {"movq_decoder": "fp16"}).record("movq_decoder")


def test_failed_conversion_leaves_the_manifest_and_files(artifacts_copy, monkeypatch):
    import k3trt.export.precision_variants as variants

    before = snapshot(artifacts_copy)
    monkeypatch.setattr(variants, "verify_variant", lambda *a, **k: ({}, ["text_encoder bf16 (storage): forced"]))
    with pytest.raises(ValidationError, match="forced"):
        add_variants(artifacts_copy, ["text_encoder"], ["bf16"], log=quiet)
    assert snapshot(artifacts_copy) == before


def test_bad_precision_requests_are_typed_errors():
    assert parse_precisions("fp32, FP16,bf16,fp16") == ("fp16", "bf16")
    with pytest.raises(InvalidArgumentError, match="'int8'.*calibrate"):
        parse_precisions("fp16,int8")
    with pytest.raises(InvalidArgumentError, match="text_encoder cannot have a converted int8"):
        check_variant_allowed("text_encoder", "int8")


def test_emulation_rounds_what_the_variant_stores():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["h", "h"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 19)])
    feeds = {"x": np.array([1.0 + 2**-12, 40000.0, -3.0], np.float32)}
    emulated, rounded = emulate_storage(model)
    assert rounded == 2  # h and s
    got = storage_session(model).run(None, feeds)[0]
    assert got[0] == 2.0 and np.isinf(got[1]) and got[2] == -6.0  # rounded to fp16, overflowed like fp16
    np.testing.assert_array_equal(got, reference_eval(model, feeds))


def test_emulation_reaches_into_subgraphs():
    """The U-Net's time condition is an `If` whose branches compute in the variant's type."""
    from onnx import TensorProto, helper

    def branch(name: str, scale: float):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT16, [3])
        k = helper.make_tensor(f"{name}_k", TensorProto.FLOAT16, [1], [scale])
        return helper.make_graph([helper.make_node("Mul", ["h", f"{name}_k"], [f"{name}_out"])], name, [], [out],
                                 initializer=[k])

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("If", ["c"], ["s"], then_branch=branch("then", 2.0), else_branch=branch("else", 3.0)),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, c], [y]), opset_imports=[helper.make_opsetid("", 19)])
    feeds = {"x": np.array([1.0, 40000.0, -3.0], np.float32), "c": np.array(True)}
    got = storage_session(model).run(None, feeds)[0]
    assert got[0] == 2.0 and np.isinf(got[1]) and got[2] == -6.0  # 2 x 40000 overflows fp16 inside the branch
    np.testing.assert_array_equal(storage_session(model).run(None, {**feeds, "c": np.array(False)})[0],
                                  reference_eval(model, {**feeds, "c": np.array(False)}))


# ----------------------------------------------------------------------------------------- converter details
def test_one_scan_dead_node_cleanup_is_modelopt_s_rule(tiny_artifacts):
    """Our replacement for ModelOpt's O(nodes^2) dead-node cleanup removes exactly what ModelOpt's removes."""
    import copy
    from types import SimpleNamespace

    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    manifest = Manifest.load(tiny_artifacts)
    model = onnx.load(str(manifest.path(manifest.onnx("text_encoder").graph.path)), load_external_data=False)
    first, count = model.graph.node[0].output[0], len(model.graph.node)
    model.graph.node.extend([  # dead ends as a conversion leaves them: an unread Cast, a chain ending in one
        onnx.helper.make_node("Cast", [first], ["dead_a"], to=onnx.TensorProto.FLOAT16, name="dead_a"),
        onnx.helper.make_node("Cast", [first], ["dead_b1"], to=onnx.TensorProto.FLOAT16, name="dead_b1"),
        onnx.helper.make_node("Cast", ["dead_b1"], ["dead_b2"], to=onnx.TensorProto.FLOAT, name="dead_b2")])
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    remove_dead_nodes(SimpleNamespace(model=ours))
    PrecisionConverter._cleanup_no_consumer_nodes(SimpleNamespace(model=theirs))
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert {n.name for n in ours.graph.node} >= {"dead_b1"} and len(ours.graph.node) == count + 1


def test_variant_opset_is_the_export_s_unless_the_type_needs_newer(tiny_artifacts):
    """bf16 Conv/InstanceNormalization exist in ONNX only from opset 22; T5's float ops take bf16 at 19."""
    manifest = Manifest.load(tiny_artifacts)
    got = {}
    for component in ("text_encoder", "unet", "movq_decoder"):
        model = onnx.load(str(manifest.path(manifest.onnx(component).graph.path)), load_external_data=False)
        got[component] = (variant_opset(model, "fp16"), variant_opset(model, "bf16"))
    assert got == {"text_encoder": (19, 19), "unet": (19, 22), "movq_decoder": (19, 22)}
    path = manifest.path(manifest.onnx("text_encoder").graph.path)
    keep = fp32_nodes(card("text_encoder").precision.islands("bf16"), onnx.load(str(path)))
    bf16 = convert(path, "bf16", keep)
    onnx.checker.check_model(bf16, full_check=True)  # bf16 types valid at the export's opset
    assert [o.version for o in bf16.opset_import if o.domain in ("", "ai.onnx")] == [19]
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in bf16.graph.initializer)
