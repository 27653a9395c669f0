"""The int8 U-Net's float parts are fp16 (issue 8): a strongly typed TensorRT runs every layer that is not quantized
in the ONNX's float type, so the Q/DQ graph calibrate records keeps int8 Q/DQ and has fp16 everywhere else
except the U-Net card's fp32 islands; the fp32-float Q/DQ graph stays beside it for the sensitivity analysis."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from k3trt.calibration.quantize import qdq_summary
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.ort import cpu_session
from k3trt.runtime.backends.ort import storage_session
from k3trt.contract.cards import card
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.tensor_metrics import compare


def test_int8_record_has_fp16_float_parts(calibrated):
    manifest = Manifest.load(calibrated[0])
    record = manifest.onnx("unet", "int8")
    assert record.extra["float_type"] == "fp16" and record.extra["converter"].startswith("nvidia-modelopt")
    assert {"/unet/time_proj/Sin", "/unet/time_proj/Cos"} <= set(record.extra["fp32_nodes"])
    fp16 = onnx.load(str(manifest.path(record.graph.path)))
    fp32 = onnx.load(str(manifest.path(record.extra["qdq_fp32_graph"])))
    onnx.checker.check_model(fp16, full_check=True)
    assert qdq_summary(fp16) == qdq_summary(fp32)  # the same layers quantized, the same Q/DQ count
    types = collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in fp16.graph.initializer)
    assert types["FLOAT16"] > 100 and types["INT8"] > 10 and types["FLOAT"] <= 2  # fp32: the time projection
    inits = {t.name: t.data_type for t in fp16.graph.initializer}
    scales = [inits[n.input[1]] for n in fp16.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert scales and set(scales) == {onnx.TensorProto.FLOAT16}
    io = {v.type.tensor_type.elem_type for v in list(fp16.graph.input) + list(fp16.graph.output)}
    assert onnx.TensorProto.FLOAT16 not in io


def test_fp16_float_parts_keep_int8_quality(calibrated):
    """On ONNX Runtime (Q/DQ as fake-quant float ops) and with fp16 storage kept, against the fp32 U-Net and the
    fp32-float Q/DQ graph. Activations quantized from fp16 land on the other side of an int8 rounding boundary
    now and then, so the fp16 graph differs from the fp32-float one by about the quantization noise itself;
    both must stay within the int8 bound of the fp32 U-Net."""
    from k3trt.export.precision_variants import verification_inputs

    manifest = Manifest.load(calibrated[0])
    record = manifest.onnx("unet", "int8")
    _, feeds = verification_inputs("unet", manifest.onnx("unet").extra["model_info"])
    reference = cpu_session(str(manifest.path(manifest.onnx("unet").graph.path))).run(None, feeds)[0]
    fake_quant = lambda path: cpu_session(str(path), disable_quant_qdq=True).run(None, feeds)[0]
    q32 = fake_quant(manifest.path(record.extra["qdq_fp32_graph"]))
    q16 = fake_quant(manifest.path(record.graph.path))
    q16_storage = storage_session(onnx.load(str(manifest.path(record.graph.path)))).run(None, feeds)[0]
    bounds = card("unet").parity_tolerance("int8").bounds()
    for got in (q32, q16, q16_storage):
        assert compare(reference, got).within(**bounds), compare(reference, got)
    assert compare(q32, q16).within(**bounds) and compare(q32, q16_storage).within(**bounds)
    assert not np.array_equal(q16, q32)  # the float parts really changed


def test_unknown_float_parts_is_refused_before_work(tmp_path):
    from cal_helpers import tiny_request

    from k3trt.calibration.stage import calibrate

    with pytest.raises(InvalidArgumentError, match="float parts 'int4'"):
        calibrate(tiny_request(tmp_path / "nothing-here", float_parts="int4"), log=lambda *_: None)
