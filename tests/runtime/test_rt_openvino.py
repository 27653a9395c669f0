"""The OpenVINO backend: fp32 parity with ONNX Runtime, bf16 within its tolerance where the CPU has native bf16,
typed refusals, one compile per request shape with a disk cache."""
import numpy as np
import pytest

from k3trt.runtime.cpuinfo import CpuInfo, cpu_info
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError
from k3trt.contract.tensor_metrics import psnr
from k3trt.runtime.pipeline import Pipeline

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'kandinsky3-trt[openvino]')")

REQUEST = dict(prompt="a red fox", seed=3, steps=4, height=64, width=64, output_type="np")
PSNR_DB = {"fp32": 40.0, "bf16": 30.0}  # vs the fp32 ONNX Runtime pipeline, same seed (the bench's bounds too)


@pytest.fixture(scope="module")
def ort_images(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort").generate(**REQUEST)


def _openvino(art, precision, cache):
    return Pipeline.from_artifacts(art, "openvino", precision, cache_dir=cache)


def test_fp32_matches_onnx_runtime_and_compiles_once_per_shape(tiny_artifacts, ort_images, tmp_path):
    pipe = _openvino(tiny_artifacts, "fp32", tmp_path / "ov")
    images = pipe.generate(**REQUEST)
    assert psnr(ort_images, images) >= PSNR_DB["fp32"]
    assert len(pipe.backend._compiled) == 3  # one per component at this request's shapes
    pipe.generate(**REQUEST)
    assert len(pipe.backend._compiled) == 3  # same shapes: nothing recompiled
    pipe.generate(**{**REQUEST, "width": 128})
    assert len(pipe.backend._compiled) == 5  # a new size compiles the U-Net and MoVQ for it, not the encoder
    assert any((tmp_path / "ov").iterdir())  # compiled blobs cached on disk for the next process
    assert pipe.backend.effective_precision("unet") == "fp32"


@pytest.mark.skipif(not cpu_info().bf16, reason=f"bf16 needs AVX-512 BF16 or AMX; this CPU: {cpu_info().describe()}")
def test_bf16_within_its_tolerance(tiny_artifacts, ort_images, tmp_path):
    pipe = _openvino(tiny_artifacts, "bf16", tmp_path / "ov")
    images = pipe.generate(**REQUEST)
    assert np.isfinite(images).all()
    value = psnr(ort_images, images)
    assert PSNR_DB["bf16"] <= value < 90  # really bf16: fp32 would agree to ~120 dB
    assert pipe.backend.config("unet")["INFERENCE_PRECISION_HINT"] == "bf16"


def test_bf16_refused_without_native_bf16(tiny_artifacts, monkeypatch, tmp_path):
    import k3trt.runtime.backends.openvino as ov_backend

    monkeypatch.setattr(ov_backend, "cpu_info", lambda: CpuInfo("Old CPU", frozenset({"avx2"})))
    with pytest.raises(BackendUnavailableError, match="AVX-512 BF16 or AMX.*Old CPU"):
        _openvino(tiny_artifacts, "bf16", tmp_path / "ov")


def test_fp32_hint_is_explicit_and_int8_needs_the_calibrated_unet(tiny_artifacts, tmp_path):
    from k3trt.contract.errors import ArtifactError

    pipe = _openvino(tiny_artifacts, "fp32", tmp_path / "ov")
    assert pipe.backend.config("unet")["INFERENCE_PRECISION_HINT"] == "f32"  # AMX would otherwise pick bf16
    with pytest.raises(ArtifactError, match="no int8 ONNX variant.*k3trt calibrate"):
        _openvino(tiny_artifacts, "int8", tmp_path / "ov").backend.record("unet")
    with pytest.raises(InvalidArgumentError, match="cannot run text_encoder in fp16"):
        _openvino(tiny_artifacts, "fp16", tmp_path / "ov")


def test_default_and_partial_maps_mean_fp32(tiny_artifacts, tmp_path):
    # "default", None and components left out of a per-component map are the baseline, as on ONNX Runtime;
    # they were refused as "cannot run movq_encoder in default"
    for precision in (None, "default", {"unet": "fp32"}):
        backend = _openvino(tiny_artifacts, precision, tmp_path / "ov").backend
        assert {backend.effective_precision(c) for c in ("text_encoder", "unet", "movq_decoder")} == {"fp32"}
        assert backend.record("unet").variant == "fp32"
        assert backend.config("movq_encoder")["INFERENCE_PRECISION_HINT"] == "f32"
