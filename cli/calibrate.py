"""`k3trt calibrate`: argument parsing only; the work is imported when the command runs."""
from __future__ import annotations

import sys

from k3trt.cli.arguments import add_size_args, resolve_size
from k3trt.contract.arguments import (
    MAX_SEED,
    MAX_STEPS,
    check_float,
    check_input_dir,
    check_int,
    check_path,
    check_threads,
    parse_resolution,
)
from k3trt.contract.cards import quantizable_components
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.manifest import Manifest
from k3trt.writing.locking import artifact_lock
from k3trt.writing.ownership import check_output_dir


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_calibrate(args) -> int:
    import contextlib
    from pathlib import Path

    from k3trt.calibration.config import QuantConfig, TrajectoryConfig
    from k3trt.calibration.report import format_summary
    from k3trt.calibration.sensitivity import SensitivityConfig
    from k3trt.calibration.stage import CalibrationRequest, calibrate, native_size

    check_calibrate_args(args)
    resolve_size(args, native_size(Manifest.load(args.artifacts), args.model))
    trajectory = TrajectoryConfig(steps=args.steps, seed=args.seed, guidance=args.guidance,
                                  height=args.height, width=args.width)
    quant = QuantConfig(calibrator=args.calibrator, percentile=args.percentile, exclude=tuple(args.exclude),
                        default_exclusions=not args.no_default_exclusions)
    sensitivity = SensitivityConfig(top_groups=args.sensitivity_blocks) if args.sensitivity else None
    request = CalibrationRequest(
        artifacts=Path(args.artifacts), trajectory=trajectory, quant=quant,
        prompts_file=Path(args.prompts) if args.prompts else None, num_prompts=args.num_prompts,
        heldout=args.heldout_prompts, sensitivity=sensitivity, out=Path(args.out) if args.out else None,
        report_dir=Path(args.report) if args.report else None, threads=args.threads, component=args.component,
        collector=args.collector, model_dir=Path(args.model) if args.model else None)
    with contextlib.ExitStack() as locks:  # one writer per artifact directory: ART, and --out if it exists
        locks.enter_context(artifact_lock(Path(args.artifacts), log))
        if args.out and (Path(args.out) / "manifest.json").is_file() and \
                Path(args.out).resolve() != Path(args.artifacts).resolve():
            locks.enter_context(artifact_lock(Path(args.out), log))
        payload = calibrate(request, log=log)
    print(format_summary(payload))
    print(f"report: {payload['report']}")
    return 0


def check_calibrate_args(args) -> None:
    """Numbers, paths and outputs before any trajectory is collected (that takes minutes)."""
    from pathlib import Path

    from k3trt.calibration.targets import target_of

    manifest = Manifest.load(args.artifacts)
    root = manifest.root
    manifest.onnx(target_of(args.component).component)  # calibratable, and exported: typed errors now
    check_int("--num-prompts", args.num_prompts, 1, 100_000, "e.g. --num-prompts 32")
    check_int("--heldout-prompts", args.heldout_prompts, 1, 1000, "e.g. --heldout-prompts 4")
    check_int("--steps", args.steps, 1, MAX_STEPS, "e.g. --steps 25")
    check_int("--seed", args.seed, 0, MAX_SEED - args.num_prompts - args.heldout_prompts,
              "prompt i uses seed + i, so the seed leaves room for every prompt")
    check_float("--guidance", args.guidance, 0, 1e4)
    check_float("--percentile", args.percentile, 50, 100, "e.g. --percentile 99.99")
    check_int("--sensitivity-blocks", args.sensitivity_blocks, 1, 1000)
    if args.resolution is not None:
        parse_resolution(args.resolution)
    check_threads(args.threads, "--threads")
    if args.model is not None:
        check_input_dir("--model", args.model, "model folder", "pass the model folder the artifacts came from")
    if args.prompts is not None:

        prompts = check_path("--prompts", args.prompts)
        if not prompts.is_file():

            raise InvalidArgumentError(f"--prompts {str(prompts)!r} " + ("is a folder" if prompts.is_dir()
                                       else "does not exist"), accepted="a UTF-8 text file, one prompt per line")
    if args.out is not None and Path(args.out).resolve() != root.resolve():
        check_output_dir(args.out, "artifacts", name="--out", inputs=(root,))
    if args.report is not None:
        check_output_dir(args.report, "report", name="--report")


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="INT8 Q/DQ U-Net from real denoising trajectories, with quality report")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--component", choices=quantizable_components(), default="unet",
                   help="which U-Net: unet (text-to-image trajectories, the default), unet_inpainting (inpainting "
                        "trajectories on box, stroke and outpaint masks), unet_flash (Flash trajectories)")
    p.add_argument("--out", metavar="ART", help="write into a copy of ART here (default: ART itself)")
    p.add_argument("--model", metavar="DIR", help="model folder the artifacts came from: its native image size, and "
                                                   "the torch collector's modules (default: the manifest's source "
                                                   "path; else 1024)")
    p.add_argument("--prompts", metavar="FILE", help="UTF-8, one prompt per line, '#' comments (default: shipped)")
    p.add_argument("--num-prompts", type=int, default=32, metavar="N", help="first N distinct prompts (default 32)")
    p.add_argument("--heldout-prompts", type=int, default=4, metavar="N",
                   help="held-out prompts for quality, never calibrated on (default 4)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per trajectory")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale of the trajectories")
    add_size_args(p, "default: the model's native size")
    p.add_argument("--collector", choices=["torch", "ort"], default=None,
                   help="what records the trajectories and activation ranges: torch (the model folder's torch "
                        "modules with hooks, on CUDA when present, else the CPU; the default) or ort (ONNX "
                        "Runtime's CPU calibrator on the fp32 ONNX). Same statistics, same Q/DQ placement")
    p.add_argument("--calibrator", choices=["max", "percentile", "entropy"], default="percentile",
                   help="how ranges are taken from the activations")
    p.add_argument("--percentile", type=float, default=99.99, help="for --calibrator percentile")
    p.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="LAYER",
                   help="ONNX node name (or substring) to keep float; repeatable")
    p.add_argument("--no-default-exclusions", action="store_true",
                   help="quantize the time embedding, conv_in/out, text projection and norm MLPs too")
    p.add_argument("--sensitivity", action="store_true", help="also rank layers by quantization cost (minutes)")
    p.add_argument("--sensitivity-blocks", type=int, default=3, metavar="K",
                   help="refine the K costliest blocks layer by layer (default 3)")
    p.add_argument("--report", metavar="DIR", help="report folder (default: ART/calibration/report-int8-<key>)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.set_defaults(func=cmd_calibrate)
