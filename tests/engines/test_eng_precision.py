"""Per-component precision selection and the fp32-node finders on the tiny graphs."""
from __future__ import annotations

import onnx
import pytest

from k3trt.engines.build_precision import parse_component_precision, select_precisions
from k3trt.export.fp32_islands import (fp32_nodes, norm_and_softmax_nodes, t5_ffn_output_matmuls, t5_residual_adds,
                                       t5_rms_norm_nodes)
from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.contract.precision import Precision

ALL = ("text_encoder", "unet", "movq_decoder")


@pytest.fixture(scope="module")
def graphs(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    return {c: onnx.load(str(manifest.path(manifest.onnx(c).graph.path)), load_external_data=False)
            for c in ALL}


def test_parse_component_precision():
    assert parse_component_precision("text_encoder=bf16, unet=FP16,movq_decoder=fp16") == {
        "text_encoder": Precision.BF16, "unet": Precision.FP16, "movq_decoder": Precision.FP16}
    assert parse_component_precision(None) == {}


@pytest.mark.parametrize("bad, needle", [("unet", "COMPONENT=PRECISION"), ("vae=fp16", "unknown component 'vae'"),
                                         ("unet=fp12", "unknown precision 'fp12'"),
                                         ("unet=fp16,unet=bf16", "appears twice")])
def test_parse_component_precision_errors(bad, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        parse_component_precision(bad)


def test_defaults_come_from_the_cards_and_every_build_is_strongly_typed():
    chosen = select_precisions(ALL)
    te, unet, movq = chosen["text_encoder"], chosen["unet"], chosen["movq_decoder"]
    assert (te.precision, te.variant, te.fp32_policy) == (Precision.BF16, "bf16", "t5_norms")
    assert (unet.precision, unet.variant, unet.fp32_policy) == (Precision.FP16, "fp16", "unet_time_projection")
    assert (movq.precision, movq.variant, movq.fp32_policy) == (Precision.FP16, "fp16", "movq_norms_softmax")
    assert all(c.to_dict()["strongly_typed"] and c.converted for c in chosen.values())
    assert all(c.tf32 for c in chosen.values())  # their fp32 islands may use TF32, as TensorRT's default allows


def test_precision_picks_the_variant_and_tf32_is_the_only_math_flag():
    te = select_precisions(["text_encoder"], "fp16")["text_encoder"]
    assert te.variant == "fp16" and te.fp32_policy == "t5_norms_wo_residual"
    fp32 = select_precisions(ALL, "fp32")
    assert all(c.variant == "fp32" and not c.tf32 and c.fp32_policy == "none" for c in fp32.values())
    tf32 = select_precisions(["unet"], "tf32")["unet"]
    assert tf32.variant == "fp32" and tf32.tf32 and tf32.precision is Precision.TF32


def test_quantized_precisions_need_a_qdq_variant(tiny_artifacts):
    from k3trt.engines.plan import make_plan

    with pytest.raises(ArtifactError, match="calibrate"):
        make_plan(Manifest.load(tiny_artifacts), precision="int8", components="unet")
    with pytest.raises(InvalidArgumentError, match="text_encoder=int8 is not a precision"):
        select_precisions(ALL, overrides={"text_encoder": Precision.INT8})
    chosen = select_precisions(ALL, "int8")
    assert chosen["unet"].variant == "int8" and not chosen["unet"].converted
    assert chosen["text_encoder"].precision is Precision.BF16  # cannot have int8: its card's default
    assert select_precisions(["unet"], "fp8")["unet"].variant == "fp8"


def test_t5_norms_found_by_structure(graphs):
    names = t5_rms_norm_nodes(graphs["text_encoder"])
    assert len(names) == 5 * 8  # 2 blocks x 2 layer norms + final norm, 8 nodes each (Cast..Mul_1)
    assert all("layer_norm/" in n for n in names)
    ops = {n.name: n.op_type for n in graphs["text_encoder"].graph.node}
    assert {ops[n] for n in names} == {"Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"}


def test_t5_wo_and_residual_adds(graphs):
    model = graphs["text_encoder"]
    wo = t5_ffn_output_matmuls(model)
    assert wo == ["/encoder/encoder/block.0/layer.1/DenseReluDense/wo/MatMul",
                  "/encoder/encoder/block.1/layer.1/DenseReluDense/wo/MatMul"]
    adds = t5_residual_adds(model, t5_rms_norm_nodes(model))
    assert "/encoder/encoder/block.1/layer.1/Add" in adds and len(adds) == 4
    guarded = fp32_nodes("t5_norms_wo_residual", model)
    assert set(wo) <= set(guarded) and set(adds) <= set(guarded) and len(guarded) == 40 + 2 + 4


def test_renamed_nodes_keep_norms_but_refuse_fp16_without_wo(graphs):
    model = onnx.ModelProto()
    model.CopyFrom(graphs["text_encoder"])
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    assert len(t5_rms_norm_nodes(model)) == 40  # structural match survives renaming
    with pytest.raises(ArtifactError, match="wo/MatMul"):
        fp32_nodes("t5_norms_wo_residual", model)


def test_movq_norms_and_softmax(graphs):
    model = graphs["movq_decoder"]
    names = norm_and_softmax_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    picked = [ops[n] for n in names]
    assert picked.count("InstanceNormalization") == sum(op == "InstanceNormalization" for op in ops.values()) == 24
    assert picked.count("Softmax") == 3
    assert "Conv" not in picked and "MatMul" not in picked  # convolutions and attention matmuls stay fp16
    assert "/decoder/mid_block/resnets.0/norm1/Mul" in names  # SpatialNorm modulation follows the norm
    assert fp32_nodes("none", graphs["unet"]) == ()


def test_unet_time_projection_keeps_the_sinusoid_argument_fp32(graphs):
    # sin/cos(t x f) with t up to 999: the argument and everything float that feeds it, not the rest
    model = graphs["unet"]
    names = fp32_nodes("unet_time_projection", model)
    ops = {n.name: n.op_type for n in model.graph.node}
    picked = sorted(ops[n] for n in names)
    assert {"Sin", "Cos", "Mul"} <= set(picked) and picked.count("Sin") == picked.count("Cos") == 1
    assert not {"Conv", "MatMul", "Gemm", "InstanceNormalization"} & set(picked)
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    mul = next(n for n in model.graph.node if n.output[0] == sin.input[0])
    assert mul.name in names and len(names) <= 8
