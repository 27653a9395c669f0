"""Side-by-side latency of the runtime and the diffusers pipeline on the same request, in one run, and how far
each stage is from this machine's limit.

A benchmark, not a timed test: every side is warmed up once, then the sides run in turn, repeat after repeat
(runtime, reference, GEMM peak, runtime, ...), so a change in machine load hits all of them alike; medians are
reported, and the ratio of the median totals. The limit: each stage's FLOPs (counted once from its ONNX graph
at the request's shapes, see flops.py) over its median time, against a large fp32 GEMM measured in the same
run, with the same thread count.
"""
from __future__ import annotations

import collections
import statistics
import time
from typing import Callable

import numpy as np
from k3trt.contract.tensor_metrics import psnr
from k3trt.verify.bench_stats import side_dispersion

Sample = dict[str, list[float]]  # stage -> seconds: one value per generation, one per call for the U-Net
STAGES = ("text_encoder", "unet_step", "movq_decoder", "total")
PSNR_BOUND_DB = {"fp32": 40.0, "bf16": 30.0}  # end-to-end image vs diffusers fp32, same seed, damped presets
# Before each timed GEMM, untimed: the previous runner's worker threads (ONNX Runtime's spin, OpenVINO's pool)
# must have left the cores, or the peak reads low (torch fp32 measured 193 GFLOP/s right after an ONNX Runtime
# run, 348 alone, on 2 cores).
SETTLE_S = 0.2
PEAK_N = 2048  # GEMM side for the peak: large enough to run at the machine's rate, small enough for ~0.1 s


def runtime_runner(pipeline, request_kwargs: dict, keep: dict | None = None) -> Callable[[], Sample]:
    """One generation per call. `keep` receives the last images and, on the first call, every component's
    input shapes (what the FLOP count needs)."""
    keep = {} if keep is None else keep

    def once() -> Sample:
        pipeline.backend.timings.clear()
        start = time.perf_counter()
        if "shapes" not in keep:
            keep["shapes"] = {}
            with _recording_shapes(pipeline.backend, keep["shapes"]):
                keep["images"] = pipeline.generate(**request_kwargs, output_type="np")
        else:
            keep["images"] = pipeline.generate(**request_kwargs, output_type="np")
        total = time.perf_counter() - start
        t = pipeline.backend.timings
        return {"text_encoder": [sum(t["text_encoder"])], "unet": list(t["unet"]),
                "movq_decoder": [sum(t["movq_decoder"])], "total": [total]}
    return once


class _recording_shapes:
    """Wrap `backend.run` to note each component's first input shapes."""

    def __init__(self, backend, shapes: dict):
        self.backend, self.shapes = backend, shapes

    def __enter__(self):
        original = self.backend.run

        def run(component, feeds):
            self.shapes.setdefault(component, {k: tuple(v.shape) for k, v in feeds.items()})
            return original(component, feeds)

        self.backend.run = run  # instance attribute shadows the method until __exit__

    def __exit__(self, *exc):
        del self.backend.run


def reference_runner(pipe, request, keep: dict | None = None) -> Callable[[], Sample]:
    from k3trt.verify.torch_reference import run_reference

    keep = {} if keep is None else keep

    def once() -> Sample:
        run = run_reference(pipe, request, record=False)
        keep["images"] = run.images
        return {"text_encoder": [sum(run.timings["text_encoder"])], "unet": list(run.timings["unet"]),
                "movq_decoder": [sum(run.timings["movq_decoder"])], "total": [run.total_s]}
    return once


# ----------------------------------------------------------------------------------------- the machine's limit
def _ort_matmul_session(n: int, threads: int | None):
    from k3trt.runtime.backends.ort import cpu_session
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return cpu_session(model.SerializeToString(), threads=threads, spin=False)


def gemm_runner(threads: int | None, *, n: int = PEAK_N, bf16: bool = False) -> Callable[[], Sample]:
    """Seconds of one n^3 GEMM per library: ONNX Runtime fp32 (what the runtime's kernels reach), torch fp32
    and, on CPUs with native bf16, torch bf16."""
    import torch

    session = _ort_matmul_session(n, threads)
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    dtypes = {"torch_fp32": torch.float32, **({"torch_bf16": torch.bfloat16} if bf16 else {})}
    operands = {name: ta.to(dtype) for name, dtype in dtypes.items()}

    def once() -> Sample:
        out = {}
        for name, x in operands.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            torch.mm(x, x)
            out[name] = [time.perf_counter() - start]
        time.sleep(SETTLE_S)
        start = time.perf_counter()
        session.run(None, {"a": a, "b": a})
        out["ort_fp32"] = [time.perf_counter() - start]
        return out
    return once


def gemm_gflops(seconds: dict, n: int = PEAK_N) -> dict:
    """Median seconds per GEMM -> GFLOP/s per library, and `fp32_peak`: the best fp32 one."""
    rates = {name: 2.0 * n**3 / s / 1e9 for name, s in seconds.items()}
    rates["fp32_peak"] = max(v for k, v in rates.items() if k.endswith("fp32"))
    return rates


def stage_gflop(manifest, shapes: dict, steps: int) -> dict:
    """GFLOP per stage of one generation: the text encoder call, one U-Net step, the MoVQ call, and the total."""
    from k3trt.verify.flops import count_file

    per_call = {c: count_file(manifest.path(manifest.onnx(c).graph.path), s) for c, s in shapes.items()}
    missing = {c: r.uncounted_nodes for c, r in per_call.items() if r.uncounted_nodes}
    gflop = {"text_encoder": per_call["text_encoder"].gflop, "unet_step": per_call["unet"].gflop,
             "movq_decoder": per_call["movq_decoder"].gflop}
    gflop["total"] = gflop["text_encoder"] + steps * gflop["unet_step"] + gflop["movq_decoder"]
    return {"gflop": gflop, "unresolved_nodes": {c: len(v) for c, v in missing.items()}}


def limit_columns(times: dict, gflop: dict, peak: float) -> dict:
    """Per stage: achieved GFLOP/s and percent of the fp32 GEMM peak, for one side's median times."""
    out = {}
    for stage in STAGES:
        rate = gflop[stage] / (times[f"{stage}_ms"] / 1e3)
        out[stage] = {"gflops": rate, "percent_of_peak": 100.0 * rate / peak}
    return out


# ----------------------------------------------------------------------------------------- interleaving
def interleaved_samples(runners: dict[str, Callable[[], Sample]], repeats: int, *, optional: tuple[str, ...] = (),
                        failed: dict | None = None) -> dict[str, dict]:
    """Warm-up, then `repeats` rounds of every runner in turn. A runner named in `optional` whose warm-up output
    is not finite is left out (its message in `failed`): one broken configuration does not void the others."""
    from k3trt.contract.errors import NonFiniteError

    runners = dict(runners)
    for name, once in list(runners.items()):
        try:
            once()  # warm-up: sessions, allocations, caches, shapes
        except NonFiniteError as exc:
            if name not in optional or failed is None:
                raise
            failed[name] = str(exc)
            del runners[name]
    samples = {name: collections.defaultdict(list) for name in runners}
    for _ in range(repeats):
        for name, once in runners.items():
            for stage, values in once().items():
                samples[name][stage] += values
    return samples


def medians_ms(stages: dict) -> dict:
    return {f"{'unet_step' if stage == 'unet' else stage}_ms": statistics.median(values) * 1e3
            for stage, values in stages.items()}


def interleaved_medians(runners: dict[str, Callable[[], Sample]], repeats: int) -> dict[str, dict]:
    """Per side: median ms of the text encoder, one U-Net step, the MoVQ decoder and the whole generation."""
    return {name: medians_ms(stages) for name, stages in interleaved_samples(runners, repeats).items()}


def unet_int8_vs_fp32(int8_times: dict, fp32_times: dict) -> dict:
    """U-Net step medians of the int8 and fp32 pipelines measured in the same run, on the same backend."""
    int8_ms, fp32_ms = int8_times["unet_step_ms"], fp32_times["unet_step_ms"]
    return {"int8_unet_step_ms": int8_ms, "fp32_unet_step_ms": fp32_ms, "int8_speedup": fp32_ms / int8_ms,
            "fp32_runtime": fp32_times}


# ----------------------------------------------------------------------------------------- report
def format_bench(result: dict) -> str:
    limit = result.get("limit")
    rows = []
    if limit:
        peak = limit["peak_gflops"]
        libs = ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in peak.items() if k != "fp32_peak")
        rows += [f"machine: {limit['cpu']}, {limit['threads']} threads",
                 f"GEMM {PEAK_N}^3 in this run (median GFLOP/s): {libs} -> fp32 peak {peak['fp32_peak']:.0f}"]
    head = f"{'stage (median)':<16} {'runtime ms':>10} {'diffusers ms':>12} {'speed-up':>8}"
    if limit:
        head += f" {'GFLOP':>8} {'runtime GFLOP/s':>15} {'% peak':>6} {'diffusers GFLOP/s':>17} {'% peak':>6}"
    rows.append(head)
    for stage in STAGES:
        ours, ref = result["runtime"][f"{stage}_ms"], result["reference"][f"{stage}_ms"]
        row = f"{stage:<16} {ours:10.1f} {ref:12.1f} {ref / ours:7.2f}x"
        if limit:
            mine, theirs = limit["runtime"][stage], limit["reference"][stage]
            row += (f" {limit['gflop'][stage]:8.1f} {mine['gflops']:15.0f} {mine['percent_of_peak']:5.0f}%"
                    f" {theirs['gflops']:17.0f} {theirs['percent_of_peak']:5.0f}%")
        rows.append(row)
    rows.append(f"ratio (diffusers total / runtime total): {result['ratio']:.2f}x")
    if limit:
        floor = limit["gflop"]["total"] / limit["peak_gflops"]["fp32_peak"]
        rows.append(f"floor at the fp32 GEMM peak: {floor * 1e3:.0f} ms per generation "
                    f"({limit['gflop']['total']:.1f} GFLOP counted: Conv/ConvTranspose/MatMul/Gemm, attention "
                    f"included)")
    if "psnr_db" in result:
        rows.append(f"image PSNR runtime ({result['precision']}) vs diffusers fp32, same seed: "
                    f"{result['psnr_db']:.1f} dB{_bound(result['precision'], result['psnr_db'])}")
    for label, other in result.get("also", {}).items():
        mine = result["limit"][label]
        rows.append(f"{label}: total {other['total_ms']:.1f} ms (U-Net step {other['unet_step_ms']:.1f}, MoVQ "
                    f"{other['movq_decoder_ms']:.1f}), {mine['total']['gflops']:.0f} GFLOP/s = "
                    f"{mine['total']['percent_of_peak']:.0f}% of the fp32 peak, {other['ratio']:.2f}x diffusers, "
                    f"PSNR vs diffusers fp32 {other['psnr_db']:.1f} dB{_bound(label.split()[-1], other['psnr_db'])}")
    rows += format_dispersion(result.get("dispersion", {}))
    if result.get("auto"):
        rows.append(f"auto chose: {result['auto']['backend']}"
                    + (f", {result['auto']['precision']}" if result["auto"].get("precision") else "")
                    + f" ({result['auto']['reason']})")
    cmp = result.get("unet_int8_vs_fp32")
    if cmp:
        rows.append(f"U-Net step (median ms): int8 {cmp['int8_unet_step_ms']:.1f} vs fp32 "
                    f"{cmp['fp32_unet_step_ms']:.1f} -> int8 speed-up {cmp['int8_speedup']:.2f}x "
                    f"({result['backend']} kernels for both; ONNX Runtime's CPU kernels may run the Q/DQ model "
                    "slower than fp32, OpenVINO's run it on integer kernels)")
    rows += [f"FAILED: {label}: {why}" for label, why in result.get("failed", {}).items()]
    rows += [f"WARNING: {w}" for w in result.get("warnings", [])]
    return "\n".join(rows)


def format_dispersion(spread: dict) -> list[str]:
    """One line per side and stage: min / median / max ms, IQR and the relative spread over the repeats."""
    rows = [f"{'dispersion (ms)':<28} {'n':>3} {'min':>9} {'median':>9} {'max':>9} {'IQR':>8} {'spread':>6}"] \
        if spread else []
    for side, stages in spread.items():
        for stage in STAGES:
            d = stages.get(stage)
            if d:
                rows.append(f"{side + ' ' + stage:<28} {d['n']:3d} {d['min_ms']:9.1f} {d['median_ms']:9.1f} "
                            f"{d['max_ms']:9.1f} {d['iqr_ms']:8.1f} {100 * d['spread']:5.0f}%")
    return rows


def _bound(precision: str, value: float) -> str:
    bound = PSNR_BOUND_DB.get(str(precision))
    return "" if bound is None else f" (bound >= {bound:.0f} dB: {'ok' if value >= bound else 'BELOW'})"


# ----------------------------------------------------------------------------------------- one benchmark run
def run_benchmark(pipe, reference_pipe, request, request_kwargs: dict, *, repeats: int, threads: int | None,
                  extra: dict[str, Callable[[], Sample]] | None = None, also: dict | None = None) -> dict:
    """Runtime vs diffusers (+ `extra` runners, + `also`: label -> another runtime Pipeline, e.g. OpenVINO bf16)
    interleaved with the GEMM peak; medians, limit columns, PSNR against diffusers."""
    from k3trt.runtime.backends.ort import default_threads
    from k3trt.runtime.cpuinfo import cpu_info

    keeps = {"runtime": {}, "reference": {}, **{label: {} for label in (also or {})}}
    runners = {"runtime": runtime_runner(pipe, request_kwargs, keeps["runtime"]),
               "reference": reference_runner(reference_pipe, request, keeps["reference"]), **(extra or {}),
               **{label: runtime_runner(other, request_kwargs, keeps[label]) for label, other in (also or {}).items()},
               "gemm": gemm_runner(threads, bf16=cpu_info().bf16)}
    failed: dict[str, str] = {}
    samples = interleaved_samples(runners, repeats, optional=tuple(also or {}), failed=failed)
    also = {label: other for label, other in (also or {}).items() if label not in failed}
    for label in failed:
        keeps.pop(label)
    gemm = samples.pop("gemm")
    result = {name: medians_ms(stages) for name, stages in samples.items()}
    spread = {name: side_dispersion(stages) for name, stages in samples.items()}
    peak = gemm_gflops({name: statistics.median(values) for name, values in gemm.items()})
    counted = stage_gflop(pipe.manifest, keeps["runtime"]["shapes"], request.steps)
    result["limit"] = {"cpu": cpu_info().describe(), "threads": threads or default_threads(),
                       "peak_gflops": peak, **counted,
                       **{side: limit_columns(result[side], counted["gflop"], peak["fp32_peak"]) for side in keeps}}
    result.update(_versus_reference(result, keeps, "runtime"))
    versus = {label: _versus_reference(result, keeps, label) for label in also or {}}
    result["also"] = {label: {**result.pop(label), **versus[label]} for label in also or {}}
    result["dispersion"] = spread
    result["floor_ms"] = 1e3 * counted["gflop"]["total"] / peak["fp32_peak"]
    result["failed"] = failed  # configurations left out: label -> why (e.g. NaN at this shape)
    return result


def _versus_reference(result: dict, keeps: dict, side: str) -> dict:
    return {"ratio": result["reference"]["total_ms"] / result[side]["total_ms"],
            "psnr_db": float(psnr(keeps["reference"]["images"], keeps[side]["images"]))}
