"""`k3trt calibrate`: argument parsing only; the work is imported when the command runs."""
from __future__ import annotations

import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from ..runtime.artifacts import Manifest
    from .config import QuantConfig, TrajectoryConfig
    from .report import format_summary
    from .sensitivity import SensitivityConfig
    from .stage import CalibrationRequest, calibrate, native_size

    size = native_size(Manifest.load(args.artifacts), args.model)
    trajectory = TrajectoryConfig(steps=args.steps, seed=args.seed, guidance=args.guidance,
                                  height=args.height or size, width=args.width or size)
    quant = QuantConfig(calibrator=args.calibrator, percentile=args.percentile, exclude=tuple(args.exclude),
                        default_exclusions=not args.no_default_exclusions)
    sensitivity = SensitivityConfig(top_groups=args.sensitivity_blocks) if args.sensitivity else None
    request = CalibrationRequest(
        artifacts=Path(args.artifacts), trajectory=trajectory, quant=quant,
        prompts_file=Path(args.prompts) if args.prompts else None, num_prompts=args.num_prompts,
        heldout=args.heldout_prompts, sensitivity=sensitivity, out=Path(args.out) if args.out else None,
        report_dir=Path(args.report) if args.report else None, threads=args.threads)
    payload = calibrate(request, log=log)
    print(format_summary(payload))
    print(f"report: {payload['report']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="INT8 Q/DQ U-Net from real denoising trajectories, with quality report")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--out", metavar="ART", help="write into a copy of ART here (default: ART itself)")
    p.add_argument("--model", metavar="DIR", help="model folder, for its native image size (default: the "
                                                   "manifest's source path; else 1024)")
    p.add_argument("--prompts", metavar="FILE", help="UTF-8, one prompt per line, '#' comments (default: shipped)")
    p.add_argument("--num-prompts", type=int, default=32, metavar="N", help="first N distinct prompts (default 32)")
    p.add_argument("--heldout-prompts", type=int, default=4, metavar="N",
                   help="held-out prompts for quality, never calibrated on (default 4)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--calibrator", choices=["max", "percentile", "entropy"], default="percentile")
    p.add_argument("--percentile", type=float, default=99.99, help="for --calibrator percentile")
    p.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="LAYER",
                   help="ONNX node name (or substring) to keep float; repeatable")
    p.add_argument("--no-default-exclusions", action="store_true",
                   help="quantize the time embedding, conv_in/out, text projection and norm MLPs too")
    p.add_argument("--sensitivity", action="store_true", help="also rank layers by quantization cost (minutes)")
    p.add_argument("--sensitivity-blocks", type=int, default=3, metavar="K",
                   help="refine the K costliest blocks layer by layer (default 3)")
    p.add_argument("--report", metavar="DIR", help="report folder (default: ART/calibration/report-int8-<key>)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=cmd_calibrate)
