"""The int8 U-Net: explicit, TensorRT-friendly Q/DQ (symmetric int8, per-channel weights, per-tensor
activations) on Conv/MatMul inputs, with the sensitive layers left float."""
import numpy as np
import onnx
import onnx.numpy_helper as nh
import pytest

from k3trt.calibration.config import DEFAULT_EXCLUSIONS, QuantConfig
from k3trt.calibration.quantize import activation_matmuls, qdq_summary, resolve_exclusions
from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def int8_model(calibrated):
    manifest = Manifest.load(calibrated[0])
    return onnx.load(str(manifest.path(manifest.onnx("unet", "int8").graph.path)))


def _producers(model):
    return {out: n for n in model.graph.node for out in n.output}


def test_loads_in_onnxruntime_and_has_qdq_around_conv_and_matmul(int8_model):
    import onnxruntime as ort

    ort.InferenceSession(int8_model.SerializeToString(), providers=["CPUExecutionProvider"])
    summary = qdq_summary(int8_model)
    producers = _producers(int8_model)
    quantized = {n.name: n for n in int8_model.graph.node if n.name in summary["quantized_nodes"]}
    assert {n.op_type for n in quantized.values()} == {"Conv", "MatMul"}
    for node in quantized.values():  # activation input: DQ <- Q <- float tensor; weight: DQ <- int8 constant
        act, weight = producers[node.input[0]], producers[node.input[1]]
        assert act.op_type == weight.op_type == "DequantizeLinear"
        assert producers[act.input[0]].op_type == "QuantizeLinear"
    assert summary["QuantizeLinear"] > 0 and len(quantized) > 100


def test_symmetric_int8_per_channel_weights_per_tensor_activations(int8_model):
    inits = {i.name: nh.to_array(i) for i in int8_model.graph.initializer}
    producers = _producers(int8_model)
    checked = 0
    for node in int8_model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name  # symmetric: zero point 0
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
        scale = inits[node.input[1]]
        if is_weight:
            weight = inits[node.input[0]]
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert weight.dtype == np.int8 and scale.shape == (weight.shape[axis],) and scale.size > 1
            consumer = next(n for n in int8_model.graph.node if node.output[0] in n.input)
            assert axis == (0 if consumer.op_type == "Conv" else 1)  # output channels
            checked += 1
        elif node.input[0] in producers or node.op_type == "QuantizeLinear":
            assert scale.size == 1  # activations: one scale per tensor
    assert checked > 100


def test_default_exclusions_and_attention_bmms_stay_float(int8_model, calibrated):
    summary = qdq_summary(int8_model)
    floats, quantized = set(summary["float_nodes"]), set(summary["quantized_nodes"])
    for pattern, _why in DEFAULT_EXCLUSIONS:
        hits = [n for n in floats | quantized if pattern in n]
        assert hits and set(hits) <= floats, pattern
    manifest = Manifest.load(calibrated[0])
    fp32 = onnx.load(str(manifest.path(manifest.onnx("unet").graph.path)), load_external_data=False)
    bmms = activation_matmuls(fp32, ("Conv", "MatMul", "Gemm"))
    assert len(bmms) == 2 * sum("attention/to_q/MatMul" in n for n in floats | quantized)  # Q.K^T and P.V
    assert set(bmms) <= floats
    assert not any("/context_mlp/" in n or n.endswith("Gemm") for n in quantized)


def test_unknown_exclude_pattern_is_a_typed_error(int8_model):
    with pytest.raises(InvalidArgumentError, match="matches none") as err:
        resolve_exclusions(int8_model, QuantConfig(exclude=("/unet/no_such_block/",)))
    assert "/unet/" in err.value.accepted  # shows real names to copy


@pytest.mark.parametrize("kwargs, match", [({"calibrator": "kl"}, "max, percentile, entropy"),
                                            ({"percentile": 100.0}, "90 <= p < 100"),
                                            ({"exclude": ("",)}, "non-empty")])
def test_bad_quant_settings_are_typed_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        QuantConfig(**kwargs)
