"""The parts of `k3trt selftest --gpu` that need CUDA but not TensorRT (they run on any lent GPU machine).

- the torch modules on CUDA against ONNX Runtime fp32 on the CPU (TF32 off: fp32 is compared as fp32);
- a CUDA-graph replay of the torch U-Net against eager calls, for two different inputs of one shape;
- GPU calibration: `k3trt calibrate --collector torch` on the exported preset at 1024 x 1024 on CUDA, its int8
  U-Net measured on held-out calls against fp32 (ONNX Runtime, fake-quant, as the calibrate command does).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch

from k3trt.contract.cards import card

GRAPH_TOLERANCE = {"cosine": 0.999999, "rel_l2": 1e-5}  # a replay runs the same kernels as an eager call
CALIBRATION = dict(resolution=1024, steps=4, prompts=2, heldout=1)  # 8 calibration U-Net calls at 1024 x 1024


@contextlib.contextmanager
def strict_fp32():
    """fp32 as fp32: cuDNN convolutions default to TF32 on Ampere and later."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cuda_module(source, component: str):
    from k3trt.export.components import SPECS

    spec = SPECS[component]
    return spec.wrapper(source.load(spec.folder)).eval().cuda(), spec


def reference_rows(source, feeds: dict, refs: dict, compare_rows) -> list:
    """Each component's torch module on CUDA vs ONNX Runtime fp32 on the CPU, within the card's fp32 bound."""
    rows = []
    with strict_fp32(), torch.inference_mode():
        for component, inputs in feeds.items():
            module, spec = cuda_module(source, component)
            out = module(*(inputs[n].cuda() for n in spec.input_names))
            bounds = card(component).engine_tolerance("fp32").bounds()
            rows += compare_rows(component, "fp32-cuda", {"ort": refs[component]["ort"]},
                                 {spec.output_names[0]: out}, bounds)
            del module
    return rows


def graph_rows(source, feeds: dict, compare_rows) -> list:
    """The torch U-Net captured once in a CUDA graph, replayed on two inputs copied into its static buffers."""
    module, spec = cuda_module(source, "unet")
    first = {n: feeds["unet"][n].cuda() for n in spec.input_names}
    second = {n: (v * 0.5 if v.is_floating_point() and n != "encoder_attention_mask" else v) for n, v in first.items()}
    static = {n: v.clone() for n, v in first.items()}
    rows = []
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs requires
            module(*static.values())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module(*static.values())
        for label, inputs in (("graph#1", first), ("graph#2", second)):
            for name, value in inputs.items():
                static[name].copy_(value)
            graph.replay()
            want = module(*inputs.values())
            rows += compare_rows("unet", "fp32-cuda", {label: {spec.output_names[0]: want}},
                                 {spec.output_names[0]: captured.clone()}, GRAPH_TOLERANCE)
    return rows


def calibration_rows(manifest, model_dir: Path, work: Path, log, make_row) -> list:
    """`k3trt calibrate --collector torch` at 1024 x 1024 on a copy of the artifacts; one row: the int8 U-Net's
    held-out mean cosine / rel L2 against fp32, within the card's int8 bound (`make_row`: the table's Row)."""
    from k3trt.calibration.config import TrajectoryConfig
    from k3trt.calibration.stage import CalibrationRequest, calibrate


    root = work / "calibration-art"
    if not root.exists():
        shutil.copytree(manifest.root, root, ignore=shutil.ignore_patterns("engines", ".k3trt.lock"))
    side = CALIBRATION["resolution"]
    request = CalibrationRequest(artifacts=root, trajectory=TrajectoryConfig(steps=CALIBRATION["steps"], height=side,
                                                                             width=side),
                                 num_prompts=CALIBRATION["prompts"], heldout=CALIBRATION["heldout"], collector="torch",
                                 model_dir=model_dir, float_parts="fp32")
    start = time.perf_counter()
    payload = calibrate(request, log=lambda message: None)
    summary = payload["components"]["unet"]["summary"]
    log(f"calibration (torch collector, {payload['settings']['collector']['device']}) at {side}x{side}: "
        f"{CALIBRATION['prompts']} prompts x {CALIBRATION['steps']} steps + {CALIBRATION['heldout']} held-out in "
        f"{time.perf_counter() - start:.1f} s")
    bound = card("unet").engine_tolerance("int8")
    ok = summary["finite"] and summary["mean_cosine"] >= bound.cosine and summary["mean_rel_l2"] <= bound.rel_l2
    return [make_row("unet", "int8", "fp32", "noise_pred", float("nan"), summary["mean_rel_l2"], summary["mean_cosine"],
                bool(ok))]
