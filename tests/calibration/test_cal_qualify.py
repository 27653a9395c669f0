"""INT8 on the CPU (issue 22 item 4): OpenVINO runs the calibrated Q/DQ U-Net with integer kernels, within the
card's int8 bound of fp32; `k3trt qualify` times it against fp32 in one interleaved run (on OpenVINO where
installed, else ONNX Runtime) and records it; `--precision auto` never picks it while it is slower or below the
bound, and an explicit `--precision int8` warns with the recorded figure."""
from __future__ import annotations

import logging

import pytest
from k3trt.cli.main import main
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import current_records
from k3trt.runtime.backends.auto import openvino_installed

INT8_BACKEND = "openvino" if openvino_installed() else "ort"  # where auto and qualify run int8 on this install


def test_int8_is_measured_against_fp32_and_warned_from_the_record(calibrated_copy, capsys, caplog):
    argv = ["qualify", "--artifacts", str(calibrated_copy), "--precision", "int8", "--prompts", "1", "--steps", "2",
            "--resolution", "64x64"]
    assert main(argv) == 0
    record = current_records(Manifest.load(calibrated_copy).data)["int8"]
    assert record["backend"] == INT8_BACKEND and record["onnx_keys"]["unet.int8"] and record["onnx_keys"]["unet.fp32"]
    assert record["unet_speedup_same_backend"] == pytest.approx(
        record["fp32_unet_step_ms_same_backend"] / record["unet_step_ms"])
    out = capsys.readouterr().out
    assert "int8" in out and f"{record['speedup']:.2f}x" in out

    from k3trt.runtime.pipeline import Pipeline

    auto = Pipeline.from_artifacts(calibrated_copy, "auto", "auto", min_psnr=0.5)
    assert auto.backend.effective_precision("unet") == ("int8" if record["speedup"] > 1 else "fp32")
    with caplog.at_level(logging.WARNING, logger="k3trt"):
        explicit = Pipeline.from_artifacts(calibrated_copy, "auto", "int8", min_psnr=record["psnr_db"] + 1)
    assert explicit.backend.name == INT8_BACKEND and explicit.backend.record("unet").variant == "int8"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"{record['psnr_db']:.1f} dB PSNR against fp32" in messages  # below the bound asked for
    if record["speedup"] < 1:  # the measured slow-down, named
        assert f"{1 / record['speedup']:.2f}x slower than fp32" in messages


@pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed (pip install 'kandinsky3-trt[openvino]')")
def test_openvino_runs_the_qdq_unet_within_the_int8_bound(calibrated):
    """The int8 record's own graph (hashed), compiled by OpenVINO: within the card's int8 engine bound of the fp32
    U-Net on ONNX Runtime, finite end to end; the other components stay fp32."""
    import torch

    from k3trt.contract.cards import card
    from k3trt.contract.tensor_metrics import compare
    from k3trt.engines.selftest import SHAPES
    from k3trt.export.components import SPECS
    from k3trt.runtime.backends.ort import OrtBackend
    from k3trt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(calibrated[0], "openvino", "int8")
    backend = pipe.backend
    assert backend.record("unet").variant == "int8" and backend.effective_precision("unet") == "int8"
    assert backend.record("text_encoder").variant == "fp32" and backend.config("unet")["INFERENCE_PRECISION_HINT"] == "f32"
    inputs = SPECS["unet"].make_inputs(SHAPES["unet"], {"vocab_size": 300, "context_dim": 64},
                                       torch.Generator().manual_seed(3))
    got = backend.run("unet", inputs)["noise_pred"]
    with OrtBackend(Manifest.load(calibrated[0]), "fp32") as ort:
        want = ort.run("unet", inputs)["noise_pred"]
    metrics = compare(want, got.float())
    assert metrics.within(**card("unet").engine_tolerance("int8").bounds()), metrics
    image = pipe.generate("a red fox", seed=1, steps=2, height=64, width=64, output_type="np")
    assert image.shape == (1, 64, 64, 3)
