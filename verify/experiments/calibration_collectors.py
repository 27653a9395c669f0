"""Seconds per U-Net call of the two calibration collectors, side by side, on one machine.

Four timings per repeat, interleaved so a busy neighbour slows all of them alike: ONNX Runtime's calibrator
(`--collector ort`: the augmented graph returning every Conv/MatMul/Gemm input, then its histogram collector),
the torch collector (`--collector torch`: the torch U-Net with folding hooks), and the plain fp32 call each
runs the trajectories with (ONNX Runtime's optimized session; the torch module without hooks). Medians are
written to --json with every sample, the thread count, the device and the load average before and after.

    python3 -m k3trt.verify.experiments.calibration_collectors --artifacts small-art --resolution 1024x1024 \\
        --repeats 3 --threads 1 --json docs/results/calibration_collectors.json
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from k3trt.verify.experiments._unet_inputs import example_feeds, unet_graph

from k3trt.calibration import quantize
from k3trt.calibration.config import QuantConfig
from k3trt.calibration.histograms import calibrator_options
from k3trt.calibration.torch_collector import RangePass, collector_device, load_module, torch_threads
from k3trt.export.sources import open_source_dir
from k3trt.contract.manifest import Manifest


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def ort_runners(graph: str, feeds: dict, config: QuantConfig, threads: int, tmp: str) -> dict:
    from onnxruntime.quantization.calibrate import create_calibrator

    from k3trt.runtime.backends.ort import cpu_session

    with quantize.quiet_library():
        calibrator = create_calibrator(graph, list(config.op_types), str(Path(tmp) / "augmented.onnx"),
                                       quantize._calibrate_method(config), extra_options=calibrator_options(config))
    calibrator.infer_session = quantize.lean_session(calibrator.augmented_model_path)
    fp32 = cpu_session(graph, threads=threads, arena=False)

    def calibrate():
        with quantize.quiet_library(), contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(quantize.FeedsReader([feeds]))

    return {"ort_calibrator_call": calibrate, "ort_fp32_call": lambda: fp32.run(None, feeds)}


def torch_runners(graph: str, model_dir: str, feeds: dict, config: QuantConfig, threads: int) -> dict:
    import torch

    from k3trt.export.components import SPECS

    device = collector_device("torch")
    source = open_source_dir(model_dir)
    import onnx

    candidates = quantize.candidate_nodes(onnx.load(graph, load_external_data=False), config.op_types)
    ranges = RangePass(Path(graph), source, "unet", config, candidates, device=device, threads=threads).__enter__()
    plain = load_module(source, "unet", device)
    inputs = [torch.from_numpy(feeds[n]).to(device) for n in SPECS["unet"].input_names]

    def forward():
        with torch.inference_mode(), torch_threads(threads if device == "cpu" else None):
            plain(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    return {"torch_collector_call": lambda: ranges.fold(feeds), "torch_fp32_call": forward}, device


def arguments():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--model", default=None, help="model folder (default: the manifest's source path)")
    parser.add_argument("--resolution", default="1024x1024", help="WxH in pixels (square latents only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="for both collectors (CPU)")
    parser.add_argument("--json", default=None, help="write the medians and samples here")
    args = parser.parse_args()
    if not (Path(args.artifacts) / "manifest.json").is_file():  # before anything loads
        parser.error(f"--artifacts {args.artifacts!r} holds no manifest.json: pass a folder `k3trt export` wrote")
    return args


def main() -> None:
    args = arguments()
    manifest = Manifest.load(args.artifacts)
    model_dir = args.model or manifest.data["source"]["path"]
    graph, feeds, config = unet_graph(args.artifacts), example_feeds(args.artifacts, args.resolution), QuantConfig()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runners = ort_runners(graph, feeds, config, args.threads, tmp)
        more, device = torch_runners(graph, model_dir, feeds, config, args.threads)
        runners.update(more)
        samples = {name: [] for name in runners}
        for repeat in range(args.repeats):
            for name, run in runners.items():
                samples[name].append(timed(run))
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {samples[name][-1]:.2f} s", flush=True)
    result = {"what": "seconds per U-Net call (guided batch 2), median of the repeats, interleaved",
              "resolution": args.resolution, "threads": args.threads, "torch_device": device,
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "note": "a shared machine: other processes ran during the measurement (see the load averages)",
              "unet_parameters": sum(p.numel() for p in load_module(open_source_dir(model_dir), "unet", "cpu")
                                     .parameters()),
              "median_s": {name: statistics.median(values) for name, values in samples.items()}, "samples_s": samples}
    print(json.dumps(result["median_s"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
