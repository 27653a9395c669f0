"""Argument helpers shared by the commands: one spelling for sizes, backends and generation options; the request
checked against the artifacts before any model loads; progress bars and output paths."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from k3trt.contract.arguments import (
    available_cores,
    check_input_dir,
    check_threads,
    parse_resolution,
)
from k3trt.contract.limits import check_image_request, default_size
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import DEFAULT_MIN_PSNR_DB
from k3trt.writing.ownership import (
    check_output_dir,
    check_output_image,
    check_output_json,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 3.0


def add_generation_args(p, *, steps: int = DEFAULT_STEPS) -> None:
    p.add_argument("--prompt", action="append", required=True, help="the text; repeat for several prompts")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (one for all prompts)")
    p.add_argument("--seed", type=int, default=0, help="0..2^64-1; each seed gives its own noise, and seeds below "
                   "2^32 give diffusers' noise for the same seed")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps, 1..1000 (default: {steps})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale, 1 or less: none (default: {DEFAULT_GUIDANCE})")
    add_size_args(p, "default: the size the artifacts were made for (64 for the tiny preset, 256 for small, "
                     "else 1024)")
    p.add_argument("--batch", dest="num_images", type=int, default=1, metavar="N",
                   help="images per prompt (a call holds prompts x batch images: what `k3trt build --batch` sizes)")
    add_renamed(p, "--num-images", "--batch N")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm reproduces diffusers.Kandinsky3Pipeline")


class RenamedOption(argparse.Action):
    """An option spelled differently before: refused with the current spelling, so no command accepts two
    spellings of one thing (issue 11: --resolution, not --height/--width; --batch, not --num-images)."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not an option of k3trt {parser.prog.split()[-1]}: give {self.replacement} "
                     "instead")


def add_renamed(p, old: str, replacement: str) -> None:
    p.add_argument(old, action=RenamedOption, replacement=replacement, dest=f"renamed_{old.strip('-')}")


def add_size_args(p, default_note: str) -> None:
    """One spelling for image sizes across commands: --resolution WxH in pixels (as `k3trt build`);
    --height/--width are refused with that spelling."""
    p.add_argument("--resolution", metavar="WxH", default=None,
                   help=f"image size in pixels, width x height, each rounded up to a multiple of 64 ({default_note})")
    for old in ("--height", "--width"):
        add_renamed(p, old, "--resolution WxH (width x height in pixels, e.g. --resolution 1024x1024)")


def resolve_size(args, default: int) -> None:
    """Set args.height/args.width from --resolution, else `default` (pixels)."""
    if getattr(args, "resolution", None) is not None:
        args.width, args.height = parse_resolution(args.resolution)
    else:
        args.height = args.width = default


def add_backend_args(p, backends=("auto", "ort", "trt", "openvino", "torch")) -> None:
    meaning = {"auto": "the fastest fp32-exact backend installed: OpenVINO where present, else ONNX Runtime "
                       "(docs/performance.md)", "ort": "ONNX Runtime", "trt": "TensorRT engines from `k3trt build`",
               "openvino": "OpenVINO on the CPU", "torch": "the PyTorch reference"}
    p.add_argument("--backend", choices=backends, default=backends[0],
                   help="; ".join(f"{name}: {meaning[name]}" for name in backends))  # only the accepted ones
    p.add_argument("--precision", default=None,
                   help="auto: the fastest precision whose quality `k3trt qualify` recorded at or above --min-psnr "
                        "(else fp32); ort: fp32 (default) | fp16 | bf16 (the ONNX variants from `k3trt export "
                        "--precision`; bf16 runs with bf16 storage emulated on the CPU provider) | int8 (the U-Net's "
                        "Q/DQ variant from `k3trt calibrate`); trt: the engines' precision, default bf16 text encoder "
                        "+ fp16 U-Net and MoVQ (`k3trt build`); openvino: fp32 (default) | bf16 (CPUs with AVX-512 "
                        "BF16 or AMX) | int8 (the U-Net's Q/DQ variant on integer kernels)")
    add_min_psnr_arg(p)
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None,
                   help=f"ONNX Runtime / OpenVINO threads, 1..{available_cores()} (default: all cores)")


def add_min_psnr_arg(p) -> None:
    p.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR_DB, metavar="DB",
                   help=f"quality bound for --precision auto, and below which an explicit precision's recorded "
                        f"figure is warned about (end-to-end PSNR vs fp32, dB; default {DEFAULT_MIN_PSNR_DB:g})")


def generation_kwargs(args) -> dict:
    prompt = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    return dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                guidance=args.guidance, height=args.height, width=args.width, num_images=args.num_images)


def checked_request(args):
    """Every generation argument checked against the artifacts before any model loads; fills in the
    artifacts' default size. Returns the Request."""
    from k3trt.runtime.pipeline import make_request

    check_threads(getattr(args, "threads", None), "--threads")
    if args.steps is None:  # `generate` leaves them unset so --flash can tell a given value from a default
        args.steps = DEFAULT_STEPS
    if args.guidance is None:
        args.guidance = DEFAULT_GUIDANCE
    manifest = args.manifest = Manifest.load(args.artifacts)  # loaded once: open_pipeline reuses it
    resolve_size(args, default_size(manifest))
    kwargs = generation_kwargs(args)
    request = make_request(kwargs.pop("prompt"), kwargs.pop("negative_prompt"), **kwargs)
    check_image_request(manifest, height=request.height, width=request.width, images=request.latent_shape[0],
                        guided=request.guided)
    return request


def resolved_precision(args) -> str | None:
    """--precision as given: the backend resolves it once, None meaning its own baseline (k3trt.contract.precision)."""
    return args.precision


def open_pipeline(args, model_dir: str | None = None):
    from k3trt.runtime.pipeline import Pipeline

    options = {"min_psnr": getattr(args, "min_psnr", DEFAULT_MIN_PSNR_DB)}
    if args.backend in ("ort", "auto"):
        options.update(provider=args.provider, threads=args.threads)
    elif args.backend == "openvino":
        options.update(threads=args.threads)
    elif args.backend == "torch":
        from k3trt.verify.torch_reference import (
            register_torch_backend,  # diffusers: only for this backend
        )

        register_torch_backend()
        options.update(model_dir=model_dir or getattr(args, "model", None))
    return Pipeline.from_artifacts(getattr(args, "manifest", None) or args.artifacts, args.backend,
                                   resolved_precision(args), scheduler=args.scheduler,
                                   lora=getattr(args, "lora", None), **options)


def progress_callback(total: int, label: str = "denoising"):
    """A step callback drawing a progress bar from the first finished step on: a request refused before the
    loop (a missing variant, a bad shape) prints its error alone, not under an empty bar."""
    from tqdm import tqdm

    bars = []

    def callback(info) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=label, unit="step", file=sys.stderr, leave=False))
        bars[0].update(1)
        if info.index + 1 == info.total:
            bars[0].close()

    return callback


def output_paths(out: str, count: int) -> list[Path]:
    """--out PATH for one image; PATH-0.png, PATH-1.png ... for several. Each is checked before any work:
    a known image extension, a writable folder, not a folder, and not a file k3trt did not write."""
    path = check_output_image(out, "--out")
    if count == 1:
        return [path]
    return [check_output_image(path.with_name(f"{path.stem}-{i}{path.suffix}"), "--out") for i in range(count)]


def check_report_args(args) -> None:
    """Where parity/bench write, checked before the run."""
    if getattr(args, "json", None):
        check_output_json(args.json, "--json")
    if getattr(args, "report", None):
        check_output_dir(args.report, "report", name="--report")
    check_input_dir("--model", args.model, "model folder", "pass the folder `k3trt preset` wrote or the "
                    "downloaded checkpoint")
