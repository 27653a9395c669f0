"""`k3trt generate | parity | bench | demo`: argument parsing, progress, and output paths."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .outputs import check_output_dir, check_output_image, check_output_json, claim_output_dir, owner_kind
from .outputs import save_image, save_json
from .errors import InvalidArgumentError
from .validate import (MAX_REPEATS, available_cores, check_input_dir, check_int, check_text, check_threads,
                       parse_resolution)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_generation_args(p, *, steps: int = 25) -> None:
    p.add_argument("--prompt", action="append", required=True, help="the text; repeat for several prompts")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (one for all prompts)")
    p.add_argument("--seed", type=int, default=0, help="0..2^64-1; each seed gives its own noise, and seeds below "
                   "2^32 give diffusers' noise for the same seed")
    p.add_argument("--steps", type=int, default=steps, help="denoising steps, 1..1000")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 or less: none)")
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


def add_backend_args(p, backends=("ort", "trt", "openvino", "torch")) -> None:
    meaning = {"ort": "ONNX Runtime", "trt": "TensorRT engines from `k3trt build`", "openvino": "OpenVINO on the CPU",
               "torch": "the PyTorch reference"}
    p.add_argument("--backend", choices=backends, default="ort",
                   help="; ".join(f"{name}: {meaning[name]}" for name in backends))  # only the accepted ones
    p.add_argument("--precision", default=None,
                   help="ort: fp32 (default) | fp16 | bf16 (the ONNX variants from `k3trt export --precision`; bf16 "
                        "runs with bf16 storage emulated on the CPU provider) | int8 (the U-Net's Q/DQ variant from "
                        "`k3trt calibrate`); trt: the engines' precision, default bf16 text encoder + fp16 U-Net "
                        "and MoVQ (`k3trt build`); openvino: fp32 (default) | bf16 (CPUs with AVX-512 BF16 or AMX)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None,
                   help=f"ONNX Runtime / OpenVINO threads, 1..{available_cores()} (default: all cores)")


def generation_kwargs(args) -> dict:
    prompt = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    return dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                guidance=args.guidance, height=args.height, width=args.width, num_images=args.num_images)


def checked_request(args):
    """Every generation argument checked against the artifacts before any model loads; fills in the
    artifacts' default size. Returns the Request."""
    from .artifacts import Manifest
    from .limits import check_image_request, default_size
    from .pipeline import make_request

    check_threads(getattr(args, "threads", None), "--threads")
    manifest = Manifest.load(args.artifacts)
    resolve_size(args, default_size(manifest))
    kwargs = generation_kwargs(args)
    request = make_request(kwargs.pop("prompt"), kwargs.pop("negative_prompt"), **kwargs)
    check_image_request(manifest, height=request.height, width=request.width, images=request.latent_shape[0],
                        guided=request.guided)
    return request


def resolved_precision(args) -> str:
    return args.precision or ("default" if args.backend == "trt" else "fp32")


def open_pipeline(args, model_dir: str | None = None):
    from .pipeline import Pipeline

    options = {}
    if args.backend == "ort":
        options = {"provider": args.provider, "threads": args.threads}
    elif args.backend == "openvino":
        options = {"threads": args.threads}
    elif args.backend == "torch":
        options = {"model_dir": model_dir or getattr(args, "model", None)}
    return Pipeline.from_artifacts(args.artifacts, args.backend, resolved_precision(args), scheduler=args.scheduler,
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


def cmd_generate(args) -> int:
    from .pipeline import to_pil
    from .task_commands import run_task, task_of, task_steps

    task = task_of(args)  # contradictory task flags fail before anything loads
    request = checked_request(args)
    paths = output_paths(args.out, request.latent_shape[0])
    pipe = open_pipeline(args)
    kwargs = generation_kwargs(args)
    if task == "text2img":
        images = pipe.generate(**kwargs, callback=progress_callback(args.steps))
    else:
        images = to_pil(run_task(pipe, task, args, kwargs, progress_callback(task_steps(task, args), task)))
    for image, path in zip(images, paths):
        save_image(image, path)
    t = pipe.backend.timings
    unet = [c for c in t if c.startswith("unet")]
    log(f"text encoder {sum(t['text_encoder']) * 1e3:.0f} ms, U-Net {sum(len(t[c]) for c in unet)} calls "
        f"{sum(sum(t[c]) for c in unet):.2f} s, MoVQ {sum(t['movq_decoder']) * 1e3:.0f} ms")
    for path in paths:
        print(path)
    return 0


def check_report_args(args) -> None:
    """Where parity/bench write, checked before the run."""
    if getattr(args, "json", None):
        check_output_json(args.json, "--json")
    if getattr(args, "report", None):
        check_output_dir(args.report, "report", name="--report")
    check_input_dir("--model", args.model, "model folder", "pass the folder `k3trt preset` wrote or the "
                    "downloaded checkpoint")


def run_parity_command(args, report_dir: str | None) -> "object":
    from ..export.reference import load_reference, run_reference
    from .parity import compare_runs, format_table, write_report

    check_report_args(args)
    request = checked_request(args)
    pipe = open_pipeline(args, model_dir=args.model)
    log(f"runtime ({args.backend}, {resolved_precision(args)}): {request.steps} steps ...")
    recorded: list = []
    images = pipe.generate(**generation_kwargs(args), output_type="np", recorder=recorded,
                           callback=progress_callback(request.steps, "runtime"))
    log("reference (diffusers.Kandinsky3Pipeline, torch fp32) ...")
    reference = run_reference(load_reference(args.model), request)
    report = compare_runs(pipe, reference, request, images, recorded)
    print(format_table(report))
    if args.json:
        save_json(report.to_dict(), Path(args.json))
    if report_dir:
        log(f"report: {write_report(report, report_dir)}")
    return report


def cmd_parity(args) -> int:
    return 0 if run_parity_command(args, args.report).ok else 1


def cmd_bench(args) -> int:
    import torch

    from ..export.reference import load_reference
    from .bench import format_bench, run_benchmark, runtime_runner, unet_int8_vs_fp32

    check_int("--repeats", args.repeats, 1, MAX_REPEATS, "e.g. --repeats 3 (medians need a few)")
    check_report_args(args)
    request = checked_request(args)
    kwargs = generation_kwargs(args)
    pipe = open_pipeline(args)
    int8 = args.backend == "ort" and str(args.precision).lower() == "int8"
    extra = {}
    if int8:
        pipe.manifest.onnx("unet", "int8")  # typed error with the fix (`k3trt calibrate`) before any loading
    if int8:  # same run, same request: the fp32 pipeline's U-Net for comparison
        fp32_pipe = open_pipeline(argparse.Namespace(**{**vars(args), "precision": "fp32"}))
        extra["runtime_fp32"] = runtime_runner(fp32_pipe, kwargs)
    also = {f"{b} {p}": open_pipeline(argparse.Namespace(**{**vars(args), "backend": b, "precision": p}))
            for b, p in (parse_also(item) for item in args.also or [])}
    log(f"benchmarking {args.repeats} interleaved repeats at {request.width}x{request.height}, {request.steps} "
        f"steps, torch threads {torch.get_num_threads()}, runtime backend {args.backend} ...")
    result = {"request": kwargs, "repeats": args.repeats, "backend": args.backend,
              "precision": resolved_precision(args),
              **run_benchmark(pipe, load_reference(args.model), request, kwargs, repeats=args.repeats,
                              threads=args.threads, extra=extra, also=also)}
    if int8:
        result["unet_int8_vs_fp32"] = unet_int8_vs_fp32(result["runtime"], result.pop("runtime_fp32"))
    print(format_bench(result))
    if args.json:
        save_json(result, Path(args.json))
    return 0


def parse_also(item: str) -> tuple[str, str]:
    backend, _, precision = item.partition(":")
    if backend not in ("ort", "openvino", "trt") or not precision:
        raise InvalidArgumentError(f"--also {item!r}", accepted="BACKEND:PRECISION with BACKEND ort, openvino or trt",
                                   fix="e.g. --also openvino:bf16 --also openvino:fp32")
    return backend, precision


def cmd_demo(args) -> int:
    """tiny preset -> export -> generate -> parity, printing where the image and the report are."""
    from ..export.presets import write_preset
    from ..export.sources import open_model_dir
    from ..export.writer import export_artifacts

    check_text("--prompt", args.prompt, allow_empty=False)
    out = claim_output_dir(args.out, "demo")  # new, empty, or an earlier demo: nothing else is written into
    seed = getattr(args, "model_seed", 0)
    model = out / ("model" if seed == 0 else f"model-seed{seed}")
    if owner_kind(model) != "preset" or not (model / "model_index.json").is_file():
        log(f"[1/4] writing the tiny preset (random weights, real classes, seed {seed}) -> {model}")
        write_preset("tiny", model, seed=seed, force=True)  # replaces only a preset k3trt wrote
    if getattr(args, "task", "text2img") != "text2img":
        from ..export.task_demo import run_task_demo

        return run_task_demo(args.task, model, out, args.prompt, log)
    log(f"[2/4] exporting to ONNX -> {out / 'artifacts'}")
    export_artifacts(open_model_dir(model), out / "artifacts", log=log)
    argv = ["--artifacts", str(out / "artifacts"), "--model", str(model), "--prompt", args.prompt,
            "--steps", "12", "--resolution", "128x64", "--seed", "0"]
    log("[3/4] generating with the lean runtime (ONNX Runtime)")
    from .cli import build_parser

    gen = build_parser().parse_args(["generate", *argv[:2], *argv[4:], "--out", str(out / "demo.png")])
    cmd_generate(gen)
    log("[4/4] parity against diffusers.Kandinsky3Pipeline")
    par = build_parser().parse_args(["parity", *argv, "--report", str(out / "report")])
    report = run_parity_command(par, par.report)
    print(f"image:  {out / 'demo.png'}\nreport: {out / 'report' / 'report.md'}")
    return 0 if report.ok else 1


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from an artifact directory")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    add_generation_args(p)
    add_backend_args(p)
    p.add_argument("--model", metavar="DIR", help="model folder (only for --backend torch)")
    p.add_argument("--out", required=True, metavar="PATH.png", help="image file (.png, .jpg, .webp); with several "
                   "images PATH-0.png, PATH-1.png, ...; an existing file is replaced only if k3trt wrote it")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="a LoRA adapter (PEFT folder, or diffusers/kohya .safetensors) applied without re-export, "
                        "scale 1 by default; repeat to blend several (backends ort, openvino, trt)")
    from .task_commands import add_task_args

    add_task_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("parity", help="runtime vs diffusers: per component, teacher-forced and end to end")
    p.add_argument("--model", required=True, metavar="DIR", help="the model folder the artifacts were exported "
                   "from (diffusers layout), for the reference run")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    add_generation_args(p)
    add_backend_args(p, ("ort", "trt", "openvino"))
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--report", metavar="DIR", help="write report.md with side-by-side images and heat maps (a new "
                   "or empty folder, or an earlier report)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="median per-stage latency: runtime vs diffusers, same run "
                                     "(--precision int8: also the int8 vs fp32 U-Net)")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--model", required=True, metavar="DIR", help="the model folder the artifacts were exported "
                   "from (diffusers layout), for the reference run")
    add_generation_args(p)
    add_backend_args(p, ("ort", "trt", "openvino"))
    p.add_argument("--repeats", type=int, default=3, help=f"timed repeats per side after a warm-up, 1..{MAX_REPEATS}")
    p.add_argument("--also", action="append", metavar="BACKEND:PRECISION",
                   help="time another runtime configuration in the same interleaved run, e.g. openvino:bf16")
    p.add_argument("--json", metavar="FILE", help="also write the medians as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="tiny preset -> export -> generate -> parity, on a fresh install")
    p.add_argument("--out", default="k3trt-demo", metavar="DIR",
                   help="folder for the model, artifacts, image and report: new, empty, or an earlier demo")
    p.add_argument("--prompt", default="a red fox in a snowy forest, watercolor", help="the text to draw")
    p.add_argument("--task", choices=["text2img", "img2img", "inpaint", "outpaint", "flash"], default="text2img",
                   help="img2img: vs diffusers.Kandinsky3Img2ImgPipeline at strength 0.6; inpaint, outpaint, "
                        "flash: vs the official-semantics torch references (docs/tasks.md); reports show input, "
                        "mask, output")
    p.add_argument("--model-seed", type=int, default=0, help="weight seed of the tiny preset (default 0)")
    p.set_defaults(func=cmd_demo)


logging.basicConfig(level=os.environ.get("K3TRT_LOG", "WARNING"), format="%(levelname)s: %(message)s")
