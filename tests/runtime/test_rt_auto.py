"""`--backend auto` / `--precision auto` (runtime/backends/auto.py): the documented rule, the recorded-quality gate,
and the warnings an explicit precision gets from `k3trt qualify`'s records."""
from __future__ import annotations

import logging

import pytest
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import check_quality_section, current_records, onnx_keys
from k3trt.runtime.backends import auto
from k3trt.runtime.backends.auto import choose_backend, choose_precision_auto, warn_from_records
from k3trt.runtime.cpuinfo import CpuInfo

BF16_CPU = CpuInfo("test cpu", frozenset({"avx512f", "avx512_bf16"}))
PLAIN_CPU = CpuInfo("old cpu", frozenset({"avx2"}))


@pytest.mark.parametrize("precision, options, has_openvino, expected", [
    (None, {}, True, "openvino"),
    ("fp32", {"threads": 1}, True, "openvino"),
    (None, {}, False, "ort"),
    ("int8", {}, True, "openvino"),  # the Q/DQ U-Net on integer kernels
    ("int8", {}, False, "ort"),
    ("fp16", {}, True, "ort"),
    ({"unet": "int8"}, {}, True, "openvino"),
    (None, {"provider": "cuda"}, True, "ort"),
    (None, {"disable_quant_qdq": True}, True, "ort"),
])
def test_backend_rule(precision, options, has_openvino, expected, monkeypatch):
    monkeypatch.setattr(auto, "cpu_info", lambda: BF16_CPU)
    choice = choose_backend(precision, options, has_openvino=has_openvino)
    assert choice.backend == expected and choice.reason


def test_bf16_without_native_bf16_goes_to_ort_and_missing_openvino_is_named(monkeypatch):
    monkeypatch.setattr(auto, "cpu_info", lambda: PLAIN_CPU)
    assert choose_backend("bf16", has_openvino=True).backend == "ort"
    assert "pip install openvino" in choose_backend(None, has_openvino=False).reason


def _manifest_data(tiny_artifacts) -> dict:
    return Manifest.load(tiny_artifacts).data


def _record(data, *, psnr_db, speedup, backend="openvino", variant="fp32") -> dict:
    keys = {**onnx_keys(data, dict.fromkeys(("text_encoder", "unet", "movq_decoder"), "fp32")),
            **onnx_keys(data, {"unet": variant})}
    return {"psnr_db": psnr_db, "cosine": 0.999, "speedup": speedup, "total_ms": 100.0 / speedup,
            "fp32_total_ms": 100.0, "backend": backend, "machine": "test cpu", "date": "2026-01-01T00:00:00Z",
            "onnx_keys": keys}


def test_precision_auto_picks_the_fastest_recorded_precision_that_meets_the_bound(tiny_artifacts, monkeypatch):
    monkeypatch.setattr(auto, "cpu_info", lambda: BF16_CPU)
    data = _manifest_data(tiny_artifacts)
    assert choose_precision_auto(data, has_openvino=True)[0] == "fp32"  # nothing recorded
    data["quality"] = {"bf16": _record(data, psnr_db=36.4, speedup=1.3)}
    chosen, backend, reason = choose_precision_auto(data, has_openvino=True)
    assert (chosen, backend) == ("bf16", "openvino") and "36.4 dB" in reason
    assert choose_precision_auto(data, min_psnr=40.0, has_openvino=True)[0] == "fp32"  # below a stricter bound
    assert choose_precision_auto(data, has_openvino=False)[0] == "fp32"  # cannot run here
    monkeypatch.setattr(auto, "cpu_info", lambda: PLAIN_CPU)
    assert choose_precision_auto(data, has_openvino=True)[0] == "fp32"
    data["quality"]["bf16"]["onnx_keys"]["unet.fp32"] = "another export"  # re-exported since: stale, ignored
    assert current_records(data) == {}


def test_slower_precision_is_never_auto_and_an_explicit_one_is_warned(tiny_artifacts, caplog, monkeypatch):
    monkeypatch.setattr(auto, "cpu_info", lambda: BF16_CPU)
    data = _manifest_data(tiny_artifacts)
    data["quality"] = {"bf16": _record(data, psnr_db=29.5, speedup=1.5),
                       "int8": _record(data, psnr_db=35.0, speedup=0.4, backend="ort", variant="fp32")}
    assert choose_precision_auto(data, has_openvino=True)[0] == "fp32"
    with caplog.at_level(logging.WARNING, logger="k3trt"):
        warnings = warn_from_records(data, {"unet": "int8"}, "ort")
        warnings += warn_from_records(data, {"unet": "bf16"}, "openvino")
    assert any("2.50x slower than fp32" in w and "250 vs 100 ms" in w for w in warnings)
    assert any("29.5 dB" in w and "below the 30 dB bound" in w for w in warnings)
    assert len(caplog.records) == 2


def test_non_finite_record_fails_every_bound_and_is_warned(tiny_artifacts, monkeypatch):
    monkeypatch.setattr(auto, "cpu_info", lambda: BF16_CPU)
    data = _manifest_data(tiny_artifacts)
    record = {k: v for k, v in _record(data, psnr_db=0.0, speedup=2.0).items()
              if k not in ("speedup", "total_ms", "fp32_total_ms")}
    data["quality"] = {"bf16": {**record, "non_finite": "unet at step 0 produced 512 NaN/Inf value(s)"}}
    check_quality_section(data["quality"], "ART")  # timings may be absent from a failed record
    assert choose_precision_auto(data, min_psnr=1e-3, has_openvino=True)[0] == "fp32"
    (warning,) = warn_from_records(data, {"unet": "bf16"}, "openvino")
    assert "NaN/Inf" in warning and "512 NaN/Inf" in warning


def test_auto_backend_through_the_pipeline_and_typed_errors(tiny_artifacts):
    from k3trt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(tiny_artifacts)  # the default: auto
    expected = "openvino" if auto.openvino_installed() else "ort"
    assert pipe.backend.name == expected and pipe.backend.auto_choice.backend == expected
    assert Pipeline.from_artifacts(tiny_artifacts, "ort").backend.auto_choice is None  # nothing was chosen
    with pytest.raises(InvalidArgumentError, match="min_psnr"):
        Pipeline.from_artifacts(tiny_artifacts, min_psnr=float("nan"))
    with pytest.raises(InvalidArgumentError, match="--precision auto with --backend trt"):
        Pipeline.from_artifacts(tiny_artifacts, "trt", "auto")
    with pytest.raises(InvalidArgumentError, match="auto, ort"):
        Pipeline.from_artifacts(tiny_artifacts, "nope")


def test_quality_section_is_checked_when_the_manifest_loads():
    with pytest.raises(ArtifactError, match=r"quality\.bf16\.psnr_db"):
        check_quality_section({"bf16": {"psnr_db": "high"}}, "ART")
    with pytest.raises(ArtifactError, match="quality"):
        check_quality_section([], "ART")
