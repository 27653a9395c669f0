"""Where a U-Net step's time goes on OpenVINO's CPU plugin (fp32): per executed operation type, from OpenVINO's
own per-node profiling (`PERF_COUNT`), split into the operations whose FLOPs `k3trt bench` counts (convolutions
and matrix products) and everything else (norms, activations, element-wise, attention softmax, reshapes), with
the counted GFLOP/s of the convolution and matrix-product time alone against this run's fp32 GEMM peak.

    python3 -m k3trt.verify.experiments.unet_time_by_op --artifacts small-art --resolution 256x256 --json docs/results/unet_time_by_op-256.json

This is the stage-by-stage answer to "why is the U-Net step not at the fp32 floor": the floor assumes every
counted FLOP runs at the GEMM peak and every other operation costs nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path


COUNTED = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul", "FullyConnected", "Deconvolution")


def gemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM GFLOP/s through torch (median of `repeats`, cores settled first): one of the two libraries whose
    best `k3trt bench` takes as its peak (there ONNX Runtime's MatMul came out slower)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        time.sleep(0.2)  # the profiled runs' worker threads leave the cores first (verify/bench.py SETTLE_S)
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> int:
    import openvino as ov

    from k3trt.runtime.cpuinfo import cpu_info
    from k3trt.verify.experiments._unet_inputs import example_feeds, unet_graph
    from k3trt.verify.flops import count_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--resolution", default="256x256", help="WxH in pixels (square)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    feeds = example_feeds(args.artifacts, args.resolution)
    core = ov.Core()
    model = core.read_model(unet_graph(args.artifacts))
    model.reshape({name: ov.PartialShape(list(value.shape)) for name, value in feeds.items()})
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": args.threads})
    request = compiled.create_infer_request()
    request.infer(feeds)  # warm-up
    per_type: dict[str, list[float]] = collections.defaultdict(list)
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        request.infer(feeds)
        walls.append(time.perf_counter() - start)
        sums: dict[str, float] = collections.defaultdict(float)
        for node in request.profiling_info:
            if node.status == ov.ProfilingInfo.Status.EXECUTED:
                sums[node.node_type] += node.real_time.total_seconds()
        for kind, seconds in sums.items():
            per_type[kind].append(seconds)
    medians = {kind: statistics.median(values) * 1e3 for kind, values in per_type.items()}
    profiled = sum(medians.values())
    counted_ms = sum(ms for kind, ms in medians.items() if kind in COUNTED)
    gflop = count_file(unet_graph(args.artifacts), {k: v.shape for k, v in feeds.items()}).gflop
    peak = gemm_peak_gflops(args.threads)
    wall_ms = statistics.median(walls) * 1e3
    result = {
        "resolution": args.resolution, "batch": int(feeds["sample"].shape[0]), "threads": args.threads,
        "wall_ms": round(wall_ms, 2), "profiled_ms": round(profiled, 2),
        "counted_ops_ms": round(counted_ms, 2), "other_ops_ms": round(profiled - counted_ms, 2),
        "counted_gflop": round(gflop, 2), "fp32_gemm_peak_gflops": round(peak, 1),
        "floor_ms": round(1e3 * gflop / peak, 2),
        "counted_ops_percent_of_peak": round(100 * gflop / (counted_ms / 1e3) / peak, 1),
        "step_percent_of_peak": round(100 * gflop / (wall_ms / 1e3) / peak, 1),
        "by_type_ms": {kind: round(ms, 3) for kind, ms in sorted(medians.items(), key=lambda kv: -kv[1])},
        "openvino": ov.__version__, "cpu": cpu_info().describe(), "cpus": os.cpu_count(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "command": "python3 -m k3trt.verify.experiments.unet_time_by_op " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
    }
    print(f"U-Net step {args.resolution} batch {result['batch']}: {wall_ms:.1f} ms; floor {result['floor_ms']} ms "
          f"({gflop:.1f} GFLOP at {peak:.0f} GFLOP/s): {result['step_percent_of_peak']}% of the peak")
    print(f"  convolutions + matrix products: {counted_ms:.1f} ms ({result['counted_ops_percent_of_peak']}% of the "
          f"peak on their own); everything else: {profiled - counted_ms:.1f} ms")
    for kind, ms in list(result["by_type_ms"].items())[:12]:
        print(f"  {kind:28s} {ms:8.2f} ms  {100 * ms / profiled:5.1f}%")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
