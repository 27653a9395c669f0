"""The performance experiments docs/performance.md quotes (verify/experiments/) run, and what they claim holds on the tiny
preset: hoisting the conditional-norm MLPs is exact, and OpenVINO keeps IR operations marked `precise` in fp32."""
from __future__ import annotations

import importlib

import pytest

from k3trt.runtime.cpuinfo import cpu_info

def experiment(name: str):
    return importlib.import_module(f"k3trt.verify.experiments.{name}")


def test_hoisting_the_mlps_is_exact_and_removes_them(tiny_artifacts):
    result = experiment("hoisting_bound").measure(str(tiny_artifacts), resolution="64x64", repeats=1, threads=1)
    assert result["gemms"] > 0 and result["weight_mb"] > 0
    assert result["nodes_after"] < result["nodes_before"] - result["gemms"]  # their activations went too
    assert result["max_abs_difference"] <= 1e-6
    assert result["original_ms"] > 0 and result["hoisted_ms"] > 0


@pytest.mark.skipif(not cpu_info().bf16, reason=f"bf16 needs AVX-512 BF16 or AMX; this CPU: {cpu_info().describe()}")
def test_openvino_honours_precise_marks_in_the_ir(tiny_artifacts):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'kandinsky3-trt[openvino]')")
    islands = ("none (plain bf16)", "time projection (Sin/Cos and its inputs)", "everything but MatMul (Conv fp32 too)")
    rows = experiment("bf16_error_by_op").measure(str(tiny_artifacts), resolution="64x64", repeats=1, threads=1,
                                                  islands=islands)["islands"]
    ran = {island: row["ran"] for island, row in rows.items()}

    def precisions(island: str, layer_type: str) -> set[str]:
        return {precision for kind, precision in ran[island].values() if kind == layer_type}

    assert precisions("none (plain bf16)", "Convolution") == {"bf16"}
    assert precisions("everything but MatMul (Conv fp32 too)", "Convolution") == {"f32"}
    time_island = ran["time projection (Sin/Cos and its inputs)"]
    assert {precision for name, (kind, precision) in time_island.items()
            if name in ("/unet/time_proj/Sin", "/unet/time_proj/Cos")} == {"f32"}
    assert all(row["finite"] and 0 < row["rel_l2"] < 1 for row in rows.values())
