"""Precision variants: fp32 fallback is announced, stale int8 variants are refused or dropped."""
import logging

import pytest

from k3trt.export.writer import drop_stale_variants
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.ort import OrtBackend
from k3trt.contract.errors import ArtifactError
from k3trt.writing.atomic import save_manifest


def _with_int8_unet(root, derived_from: str) -> Manifest:
    manifest = Manifest.load(root)
    record = dict(manifest.data["onnx"]["unet"]["fp32"], variant="int8")
    record["extra"] = {**record["extra"], "fp32_export_key": derived_from}
    manifest.data["onnx"]["unet"]["int8"] = record
    save_manifest(manifest)
    return Manifest.load(root)


def test_missing_variant_falls_back_to_fp32_with_one_warning(tiny_artifacts, caplog):
    backend = OrtBackend(Manifest.load(tiny_artifacts), "int8")
    with caplog.at_level(logging.WARNING, logger="k3trt"):
        assert backend.record("text_encoder").variant == "fp32"
        assert backend.record("text_encoder").variant == "fp32"
    assert caplog.text.count("text_encoder has no int8 ONNX variant") == 1


def test_current_int8_variant_is_selected(artifacts_copy):
    manifest = Manifest.load(artifacts_copy)
    manifest = _with_int8_unet(artifacts_copy, manifest.onnx("unet").export_key)
    assert OrtBackend(manifest, "int8").record("unet").variant == "int8"


def test_stale_int8_variant_is_refused(artifacts_copy):
    manifest = _with_int8_unet(artifacts_copy, "an-older-export")
    with pytest.raises(ArtifactError, match="derived from an earlier fp32 export") as info:
        OrtBackend(manifest, "int8").record("unet")
    assert "k3trt calibrate" in str(info.value)


def test_export_drops_stale_variants_only(artifacts_copy):
    manifest = _with_int8_unet(artifacts_copy, "an-older-export")
    messages = []
    drop_stale_variants(manifest, "unet", messages.append)
    assert set(manifest.data["onnx"]["unet"]) == {"fp32"} and "stale int8" in messages[0]
    manifest = _with_int8_unet(artifacts_copy, Manifest.load(artifacts_copy).onnx("unet").export_key)
    drop_stale_variants(manifest, "unet", messages.append)
    assert set(manifest.data["onnx"]["unet"]) == {"fp32", "int8"} and len(messages) == 1


def test_unavailable_and_unknown_ort_providers_are_typed_errors(tiny_artifacts):
    import onnxruntime

    from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError

    manifest = Manifest.load(tiny_artifacts)
    with pytest.raises(InvalidArgumentError, match="provider 'rocm'"):
        OrtBackend(manifest, provider="rocm")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider; the unavailable case cannot be shown here")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider is not available") as info:
        OrtBackend(manifest, provider="cuda")
    assert "kandinsky3-trt[gpu]" in str(info.value)
