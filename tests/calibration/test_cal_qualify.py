"""INT8 on the CPU (issue 22 item 4): `k3trt qualify` times the calibrated Q/DQ U-Net against fp32 on ONNX Runtime
in one interleaved run and records it; `--precision auto` never picks it while it is slower or below the bound,
and an explicit `--precision int8` on a CPU backend warns with the recorded slow-down."""
from __future__ import annotations

import logging

import pytest
from k3trt.cli.main import main
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import current_records


def test_int8_is_measured_against_fp32_and_warned_from_the_record(calibrated_copy, capsys, caplog):
    argv = ["qualify", "--artifacts", str(calibrated_copy), "--precision", "int8", "--prompts", "1", "--steps", "2",
            "--resolution", "64x64"]
    assert main(argv) == 0
    record = current_records(Manifest.load(calibrated_copy).data)["int8"]
    assert record["backend"] == "ort" and record["onnx_keys"]["unet.int8"] and record["onnx_keys"]["unet.fp32"]
    assert record["unet_speedup_same_backend"] == pytest.approx(
        record["fp32_unet_step_ms_same_backend"] / record["unet_step_ms"])
    out = capsys.readouterr().out
    assert "int8" in out and f"{record['speedup']:.2f}x" in out

    from k3trt.runtime.pipeline import Pipeline

    auto = Pipeline.from_artifacts(calibrated_copy, "auto", "auto", min_psnr=0.5)
    assert auto.backend.effective_precision("unet") == ("int8" if record["speedup"] > 1 else "fp32")
    with caplog.at_level(logging.WARNING, logger="k3trt"):
        explicit = Pipeline.from_artifacts(calibrated_copy, "auto", "int8", min_psnr=record["psnr_db"] + 1)
    assert explicit.backend.name == "ort"  # auto: only ONNX Runtime reads the Q/DQ variant
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"{record['psnr_db']:.1f} dB PSNR against fp32" in messages  # below the bound asked for
    if record["speedup"] < 1:  # the measured slow-down, named
        assert f"{1 / record['speedup']:.2f}x slower than fp32" in messages
