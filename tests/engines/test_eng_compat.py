"""Engine compatibility, selection, feed-vs-profile checks and layer mapping: pure, on fake manifest entries."""
from __future__ import annotations

import pytest

from k3trt.contract.engine_compat import (DeviceEnv, check_engine_compatible, check_feeds_in_profile,
                                         check_precision_supported, rebuild_command, select_engine)
from k3trt.contract.errors import ArtifactError, EngineCompatibilityError, ShapeError

ENV = DeviceEnv("10.3.0", "NVIDIA A100-SXM4-80GB", (8, 0))


def entry(**over):
    base = {"component": "unet", "precision": "fp16", "build_precision": "default", "variant": "fp32",
            "tensorrt": "10.3.0", "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": [8, 0]},
            "onnx_sha256": "a" * 64, "file": {"path": "engines/unet-fp16-x.plan", "sha256": "b" * 64, "bytes": 1},
            "request": {"resolutions": ["1024x1024"], "batch": [1, 4], "guidance": True},
            "flags": {"refittable": True}, "built_at": "2025-01-01T00:00:00+00:00"}
    base.update(over)
    return base


def test_compatible_engine_passes():
    assert check_engine_compatible("unet-fp16", entry(), ENV, onnx_sha256="a" * 64, artifacts="/art") == []


def test_other_tensorrt_version_is_refused_with_both_versions_and_the_rebuild_command():
    with pytest.raises(EngineCompatibilityError) as err:
        check_engine_compatible("unet-fp16", entry(tensorrt="10.0.1"), ENV, onnx_sha256=None, artifacts="/art")
    text = str(err.value)
    assert "10.0.1" in text and "10.3.0" in text
    assert ("k3trt build --artifacts /art --components unet --component-precision unet=fp16 --resolution "
            "1024x1024 --batch 1-4 --refittable") in text


def test_other_compute_capability_is_refused():
    h100 = DeviceEnv("10.3.0", "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(EngineCompatibilityError, match=r"compute capability 8\.0 .* is 9\.0"):
        check_engine_compatible("unet-fp16", entry(), h100, onnx_sha256=None, artifacts="/art")


def test_stale_engine_after_reexport_is_refused():
    with pytest.raises(EngineCompatibilityError, match="re-exported"):
        check_engine_compatible("unet-fp16", entry(), ENV, onnx_sha256="c" * 64, artifacts="/art")


def test_same_capability_other_gpu_only_warns():
    a30 = DeviceEnv("10.3.0", "NVIDIA A30", (8, 0))
    warnings = check_engine_compatible("unet-fp16", entry(), a30, onnx_sha256=None, artifacts="/art")
    assert len(warnings) == 1 and "A100" in warnings[0] and "A30" in warnings[0]


def test_rebuild_command_single_batch_and_no_guidance():
    cmd = rebuild_command("/my art", entry(request={"resolutions": ["512x512"], "batch": [2, 2], "guidance": False},
                                           flags={}))
    assert cmd == ("k3trt build --artifacts '/my art' --components unet --component-precision unet=fp16 "
                   "--resolution 512x512 --batch 2 --no-guidance")


def test_precision_needs_hardware():
    with pytest.raises(EngineCompatibilityError, match=r"fp8 .* >= 8\.9"):
        check_precision_supported("fp8", (8, 0), "A100")
    with pytest.raises(EngineCompatibilityError, match="bf16"):
        check_precision_supported("bf16", (7, 5), "T4")
    check_precision_supported("fp8", (9, 0))
    check_precision_supported("fp16", (7, 5))


def test_select_engine_by_precision_then_build_precision():
    engines = {"unet-fp16": entry(), "unet-int8": entry(precision="int8", variant="int8", build_precision="int8"),
               "text_encoder-bf16": entry(component="text_encoder", precision="bf16", build_precision="int8")}
    assert select_engine(engines, "unet", "int8")[0] == "unet-int8"
    assert select_engine(engines, "text_encoder", "int8")[0] == "text_encoder-bf16"  # same build run
    with pytest.raises(ArtifactError) as err:
        select_engine(engines, "movq_decoder", "fp16", "/art")
    assert "k3trt build --artifacts /art --components movq_decoder" in str(err.value)
    newer = {"a": entry(built_at="2025-01-02"), "b": entry(built_at="2025-03-01")}
    assert select_engine(newer, "unet", "fp16")[0] == "b"


PROFILE = {"sample": ((2, 4, 128, 128), (2, 4, 128, 128), (8, 4, 128, 128)),
           "encoder_hidden_states": ((2, 1, 64), (2, 77, 64), (8, 128, 64))}


def test_feeds_inside_profile_pass():
    check_feeds_in_profile("unet-fp16", PROFILE, {"sample": (4, 4, 128, 128), "encoder_hidden_states": (4, 128, 64)})


def test_feeds_outside_profile_name_the_engine_and_range():
    with pytest.raises(ShapeError) as err:
        check_feeds_in_profile("unet-fp16", PROFILE,
                               {"sample": (2, 4, 96, 96), "encoder_hidden_states": (2, 9, 64)})
    text = str(err.value)
    assert "unet-fp16" in text and "(2, 4, 96, 96)" in text and "(2, 4, 128, 128) .. (8, 4, 128, 128)" in text
    with pytest.raises(ShapeError, match="needs input"):
        check_feeds_in_profile("unet-fp16", PROFILE, {"sample": (2, 4, 128, 128)})
    with pytest.raises(ShapeError, match="static"):
        check_feeds_in_profile("e", {"x": ((1, 2), (1, 2), (1, 2))}, {"x": (1, 2, 1)})
