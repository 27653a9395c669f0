"""Per-component precision selection and the fp32-node finders on the tiny graphs."""
from __future__ import annotations

import onnx
import pytest

from k3trt.engines.precision import (fp32_nodes, norm_and_softmax_nodes, parse_component_precision,
                                     select_precisions, t5_ffn_output_matmuls, t5_residual_adds, t5_rms_norm_nodes)
from k3trt.runtime.artifacts import Manifest
from k3trt.runtime.errors import ArtifactError, InvalidArgumentError
from k3trt.runtime.precision import Precision

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


def test_defaults_keep_parity():
    chosen = select_precisions(ALL)
    te, unet, movq = chosen["text_encoder"], chosen["unet"], chosen["movq_decoder"]
    assert (te.precision, te.builder_flags, te.fp32_policy) == (Precision.BF16, ("bf16",), "t5_norms")
    assert (unet.precision, unet.builder_flags, unet.fp32_policy) == (Precision.FP16, ("fp16",), "none")
    assert (movq.precision, movq.fp32_policy) == (Precision.FP16, "movq_norms_softmax")
    assert not any(c.strongly_typed for c in chosen.values())


def test_forced_fp16_text_encoder_is_guarded_and_fp32_is_strongly_typed():
    te = select_precisions(["text_encoder"], "fp16")["text_encoder"]
    assert te.precision is Precision.FP16 and te.fp32_policy == "t5_norms_wo_residual"
    fp32 = select_precisions(ALL, "fp32")
    assert all(c.strongly_typed and c.builder_flags == () and c.fp32_policy == "none" for c in fp32.values())
    tf32 = select_precisions(["unet"], "tf32")["unet"]
    assert tf32.builder_flags == ("tf32",) and not tf32.strongly_typed


def test_quantized_precisions_need_a_qdq_variant():
    with pytest.raises(ArtifactError, match="calibrate"):
        select_precisions(ALL, "int8", variants={c: ["fp32"] for c in ALL})
    with pytest.raises(ArtifactError, match="text_encoder=int8"):
        select_precisions(ALL, overrides={"text_encoder": Precision.INT8})
    chosen = select_precisions(ALL, "int8", variants={"unet": ["fp32", "int8"]})
    assert chosen["unet"].variant == "int8" and chosen["unet"].builder_flags == ("int8", "fp16")
    assert chosen["text_encoder"].precision is Precision.BF16  # no int8 variant: its default
    fp8 = select_precisions(["unet"], "fp8", variants={"unet": ["fp32", "fp8"]})["unet"]
    assert fp8.builder_flags == ("fp8", "fp16") and fp8.variant == "fp8"


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
