"""Side-by-side latency of the runtime and the diffusers pipeline on the same request, in one run.

A benchmark, not a timed test: every side is warmed up once, then the sides run in turn, repeat after repeat
(runtime, reference, runtime, ...), so a change in machine load hits all of them alike; medians are reported,
and the ratio of the median totals.
"""
from __future__ import annotations

import collections
import statistics
import time
from typing import Callable

Sample = dict[str, list[float]]  # stage -> seconds: one value per generation, one per call for the U-Net


def runtime_runner(pipeline, request_kwargs: dict) -> Callable[[], Sample]:
    def once() -> Sample:
        pipeline.backend.timings.clear()
        start = time.perf_counter()
        pipeline.generate(**request_kwargs)
        total = time.perf_counter() - start
        t = pipeline.backend.timings
        return {"text_encoder": [sum(t["text_encoder"])], "unet": list(t["unet"]),
                "movq_decoder": [sum(t["movq_decoder"])], "total": [total]}
    return once


def reference_runner(pipe, request) -> Callable[[], Sample]:
    from ..export.reference import run_reference

    def once() -> Sample:
        run = run_reference(pipe, request, record=False)
        return {"text_encoder": [sum(run.timings["text_encoder"])], "unet": list(run.timings["unet"]),
                "movq_decoder": [sum(run.timings["movq_decoder"])], "total": [run.total_s]}
    return once


def interleaved_medians(runners: dict[str, Callable[[], Sample]], repeats: int) -> dict[str, dict]:
    """Per side: median ms of the text encoder, one U-Net step, the MoVQ decoder and the whole generation."""
    for once in runners.values():
        once()  # warm-up: sessions, allocations, caches
    samples = {name: collections.defaultdict(list) for name in runners}
    for _ in range(repeats):
        for name, once in runners.items():
            for stage, values in once().items():
                samples[name][stage] += values
    return {name: {f"{'unet_step' if stage == 'unet' else stage}_ms": statistics.median(values) * 1e3
                   for stage, values in stages.items()} for name, stages in samples.items()}


def unet_int8_vs_fp32(int8_times: dict, fp32_times: dict) -> dict:
    """U-Net step medians of the int8 and fp32 pipelines measured in the same run (ONNX Runtime kernels)."""
    int8_ms, fp32_ms = int8_times["unet_step_ms"], fp32_times["unet_step_ms"]
    return {"int8_unet_step_ms": int8_ms, "fp32_unet_step_ms": fp32_ms, "int8_speedup": fp32_ms / int8_ms,
            "fp32_runtime": fp32_times}


def format_bench(result: dict) -> str:
    rows = [f"{'stage (median ms)':<20} {'runtime':>12} {'diffusers':>12} {'speed-up':>9}"]
    for key in ("text_encoder_ms", "unet_step_ms", "movq_decoder_ms", "total_ms"):
        ours, ref = result["runtime"][key], result["reference"][key]
        rows.append(f"{key[:-3]:<20} {ours:12.1f} {ref:12.1f} {ref / ours:8.2f}x")
    rows.append(f"ratio (diffusers total / runtime total): {result['ratio']:.2f}x")
    cmp = result.get("unet_int8_vs_fp32")
    if cmp:
        rows.append(f"U-Net step (median ms): int8 {cmp['int8_unet_step_ms']:.1f} vs fp32 "
                    f"{cmp['fp32_unet_step_ms']:.1f} -> int8 speed-up {cmp['int8_speedup']:.2f}x "
                    "(ONNX Runtime kernels; the Q/DQ model targets TensorRT and may run slower than fp32 on a CPU)")
    return "\n".join(rows)
