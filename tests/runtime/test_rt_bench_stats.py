"""`k3trt bench`'s dispersion, reliability warnings (issue 19 item 8) and the performance page rendered from its
result files (verify/bench_stats.py, verify/perf_page.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from k3trt.contract.errors import InvalidArgumentError
from k3trt.verify import perf_page
from k3trt.verify.bench_stats import MAX_SPREAD, dispersion, reliability_warnings

REPO = Path(__file__).resolve().parents[2]


def test_dispersion_in_ms_with_quartiles_and_spread():
    d = dispersion([0.100, 0.110, 0.120, 0.130, 0.200])
    assert (d["n"], d["min_ms"], d["median_ms"], d["max_ms"]) == (5, 100.0, 120.0, 200.0)
    assert (d["q1_ms"], d["q3_ms"]) == pytest.approx((110.0, 130.0))
    assert d["iqr_ms"] == pytest.approx(20.0) and d["spread"] == pytest.approx(100 / 120)
    assert dispersion([0.05])["spread"] == 0.0


def _machine(before=0.1, after=2.0, cores=2, threads=2):
    return {"cores": cores, "threads": threads, "load_before": before, "load_after": after}


def test_quiet_run_has_no_warning_and_each_rule_fires_alone():
    tight = {"runtime": {"total": dispersion([1.0, 1.01, 1.02])}}
    assert reliability_warnings(tight, 3, _machine()) == []
    assert "only 2 timed repeat" in reliability_warnings(tight, 2, _machine())[0]
    wide = {"runtime": {"total": dispersion([1.0, 1.0 + 2 * MAX_SPREAD, 1.05])}}
    (warning,) = reliability_warnings(wide, 3, _machine())
    assert "runtime: total time spread" in warning and "unreliable" in warning
    (warning,) = reliability_warnings(tight, 3, _machine(before=12.1))
    assert "load average 12.10 on 2 cores before the run" in warning
    (warning,) = reliability_warnings(tight, 3, _machine(after=9.0))
    assert "9.00 after the run" in warning


def _result(**over) -> dict:
    times = {"text_encoder_ms": 10.0, "unet_step_ms": 50.0, "movq_decoder_ms": 200.0, "total_ms": 1460.0}
    ref = {**times, "total_ms": 2920.0}
    base = {"date": "2026-01-01T00:00:00Z", "request": {"width": 256, "height": 256, "steps": 25},
            "repeats": 5, "backend": "openvino", "precision": "fp32",
            "auto": {"backend": "openvino", "precision": None, "reason": "OpenVINO is installed"},
            "runtime": times, "reference": ref, "ratio": 2.0, "psnr_db": 108.6, "floor_ms": 1314.0,
            "also": {"openvino bf16": {**times, "total_ms": 1000.0, "ratio": 2.92, "psnr_db": 29.5}},
            "dispersion": {"runtime": {"total": dispersion([1.45, 1.46, 1.48])},
                           "reference": {"total": dispersion([2.9, 2.92, 2.95])}},
            "machine": {"cpu": "test cpu", "threads": 2, "cores": 2, "load_before": 0.2, "load_after": 2.1},
            "versions": {"onnxruntime": "1.0", "openvino": None}, "warnings": ["example warning"]}
    return {**base, **over}


def test_page_block_renders_every_figure_from_the_result(tmp_path):
    path = tmp_path / "bench-256.json"
    path.write_text(json.dumps(_result()))
    block = perf_page.render([path])
    assert "| openvino fp32 (auto) | 1,460 | 1,450 / 1,480 (IQR 15) | 50.0 | 200 | 2.00x | 90% | 108.6 dB |" in block
    assert "| openvino bf16 | 1,000 | n/a | 50.0 | 200 | 2.92x | 131% | 29.5 dB |" in block
    assert "| diffusers fp32 | 2,920 |" in block and "load average 0.20 before, 2.10 after" in block
    assert "> **Warning:** example warning" in block and "openvino None" not in block
    assert perf_page.render([]).startswith(perf_page.EMPTY)


def test_page_update_replaces_only_the_block(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\nhand-written\n{perf_page.BEGIN}\nold\n{perf_page.END}\ntail\n")
    result = tmp_path / "r.json"
    result.write_text(json.dumps(_result()))
    assert perf_page.main([str(result), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Performance\nhand-written\n") and text.endswith(f"{perf_page.END}\ntail\n")
    assert "old" not in text and "| openvino fp32 (auto) |" in text
    with pytest.raises(InvalidArgumentError, match="generated block"):
        perf_page.replace_block("no markers", "x")


def test_docs_page_is_what_the_result_files_render():
    """docs/performance.md's generated block is exactly what docs/results/bench-*.json render to."""
    page = (REPO / "docs" / "performance.md").read_text()
    files = sorted((REPO / "docs" / "results").glob("bench-*.json"))
    assert perf_page.replace_block(page, perf_page.render(files)) == page


def test_a_configuration_that_gives_nan_is_left_out_and_named_not_the_whole_run():
    """`--also openvino:bf16` gave NaN at one shape (OpenVINO 2026.4 CPU bf16, small preset, batch 2 x 15 text
    tokens): that configuration is reported as failed and the others are still timed; a failing required side
    (the runtime itself) still stops the run."""
    from k3trt.contract.errors import NonFiniteError
    from k3trt.verify.bench import interleaved_samples

    def fine():
        return {"total": [0.01]}

    def broken():
        raise NonFiniteError("unet at step 0 (t=961) produced 8192 NaN/Inf value(s)")

    failed: dict = {}
    samples = interleaved_samples({"runtime": fine, "openvino bf16": broken}, 3, optional=("openvino bf16",),
                                  failed=failed)
    assert set(samples) == {"runtime"} and samples["runtime"]["total"] == [0.01] * 3
    assert "8192 NaN/Inf" in failed["openvino bf16"]
    with pytest.raises(NonFiniteError):
        interleaved_samples({"runtime": broken}, 1, optional=(), failed={})
