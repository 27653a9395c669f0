"""Side-by-side latency of the runtime and the diffusers pipeline on the same request, in one run.

A benchmark, not a timed test: medians over repeats, after one warm-up each, and the ratio of the totals.
"""
from __future__ import annotations

import statistics
import time


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def runtime_stage_times(pipeline, request_kwargs: dict, repeats: int) -> dict:
    pipeline.generate(**request_kwargs)  # warm-up: sessions, allocations, caches
    totals, per_stage = [], {"text_encoder": [], "unet": [], "movq_decoder": []}
    for _ in range(repeats):
        pipeline.backend.timings.clear()
        start = time.perf_counter()
        pipeline.generate(**request_kwargs)
        totals.append(time.perf_counter() - start)
        for stage in per_stage:
            calls = pipeline.backend.timings[stage]
            per_stage[stage] += calls if stage == "unet" else [sum(calls)]
    return {"text_encoder_ms": _median(per_stage["text_encoder"]) * 1e3,
            "unet_step_ms": _median(per_stage["unet"]) * 1e3,
            "movq_decoder_ms": _median(per_stage["movq_decoder"]) * 1e3, "total_ms": _median(totals) * 1e3}


def reference_stage_times(pipe, request, repeats: int) -> dict:
    from ..export.reference import run_reference

    run_reference(pipe, request, record=False)  # warm-up
    totals, per_stage = [], {"text_encoder": [], "unet": [], "movq_decoder": []}
    for _ in range(repeats):
        run = run_reference(pipe, request, record=False)
        totals.append(run.total_s)
        for stage in per_stage:
            per_stage[stage] += run.timings[stage] if stage == "unet" else [sum(run.timings[stage])]
    return {"text_encoder_ms": _median(per_stage["text_encoder"]) * 1e3,
            "unet_step_ms": _median(per_stage["unet"]) * 1e3,
            "movq_decoder_ms": _median(per_stage["movq_decoder"]) * 1e3, "total_ms": _median(totals) * 1e3}


def format_bench(result: dict) -> str:
    rows = [f"{'stage (median ms)':<20} {'runtime':>12} {'diffusers':>12} {'speed-up':>9}"]
    for key in ("text_encoder_ms", "unet_step_ms", "movq_decoder_ms", "total_ms"):
        ours, ref = result["runtime"][key], result["reference"][key]
        rows.append(f"{key[:-3]:<20} {ours:12.1f} {ref:12.1f} {ref / ours:8.2f}x")
    rows.append(f"ratio (diffusers total / runtime total): {result['ratio']:.2f}x")
    return "\n".join(rows)
