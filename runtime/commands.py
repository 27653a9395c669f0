"""`k3trt generate | parity | bench | demo`: argument parsing, progress, and output paths."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_generation_args(p, *, size: int = 1024, steps: int = 25) -> None:
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--height", type=int, default=size)
    p.add_argument("--width", type=int, default=size)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")


def add_backend_args(p, backends=("ort", "trt", "openvino", "torch")) -> None:
    p.add_argument("--backend", choices=backends, default="ort")
    p.add_argument("--precision", default=None,
                   help="ort: fp32 (default) | fp16 | bf16 (the ONNX variants from `k3trt export --precision`; bf16 "
                        "runs with bf16 storage emulated on the CPU provider) | int8 (the U-Net's Q/DQ variant from "
                        "`k3trt calibrate`); trt: the engines' precision, default bf16 text encoder + fp16 U-Net "
                        "and MoVQ (`k3trt build`); openvino: fp32 (default) | bf16 (CPUs with AVX-512 BF16 or AMX)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime / OpenVINO threads (default: all cores)")


def generation_kwargs(args) -> dict:
    prompt = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    return dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                guidance=args.guidance, height=args.height, width=args.width, num_images=args.num_images)


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
                                   **options)


def progress_callback(total: int, label: str = "denoising"):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, leave=False)

    def callback(info) -> None:
        bar.update(1)
        if info.index + 1 == info.total:
            bar.close()

    return callback


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def cmd_generate(args) -> int:
    from .pipeline import to_pil
    from .task_commands import run_task, task_of, task_steps

    task = task_of(args)  # contradictory task flags fail before anything loads
    pipe = open_pipeline(args)
    kwargs = generation_kwargs(args)
    if task == "text2img":
        images = pipe.generate(**kwargs, callback=progress_callback(args.steps))
    else:
        images = to_pil(run_task(pipe, task, args, kwargs, progress_callback(task_steps(task, args), task)))
    paths = output_paths(args.out, len(images))
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    t = pipe.backend.timings
    unet = [c for c in t if c.startswith("unet")]
    log(f"text encoder {sum(t['text_encoder']) * 1e3:.0f} ms, U-Net {sum(len(t[c]) for c in unet)} calls "
        f"{sum(sum(t[c]) for c in unet):.2f} s, MoVQ {sum(t['movq_decoder']) * 1e3:.0f} ms")
    for path in paths:
        print(path)
    return 0


def run_parity_command(args, report_dir: str | None) -> "object":
    from ..export.reference import load_reference, run_reference
    from .parity import compare_runs, format_table, write_report
    from .pipeline import make_request

    kwargs = generation_kwargs(args)
    request = make_request(kwargs.pop("prompt"), kwargs.pop("negative_prompt"), **kwargs)
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
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=float))
    if report_dir:
        log(f"report: {write_report(report, report_dir)}")
    return report


def cmd_parity(args) -> int:
    return 0 if run_parity_command(args, args.report).ok else 1


def cmd_bench(args) -> int:
    import argparse

    import torch

    from ..export.reference import load_reference
    from .bench import format_bench, run_benchmark, runtime_runner, unet_int8_vs_fp32
    from .pipeline import make_request

    kwargs = generation_kwargs(args)
    request = make_request(kwargs["prompt"], kwargs["negative_prompt"], **{k: v for k, v in kwargs.items()
                                                                          if k not in ("prompt", "negative_prompt")})
    pipe = open_pipeline(args)
    int8 = args.backend == "ort" and str(args.precision).lower() == "int8"
    extra = {}
    if int8:  # same run, same request: the fp32 pipeline's U-Net for comparison
        pipe.manifest.onnx("unet", "int8")  # typed error with the fix (`k3trt calibrate`) before any timing
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
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def parse_also(item: str) -> tuple[str, str]:
    from .errors import InvalidArgumentError

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

    out = Path(args.out)
    seed = getattr(args, "model_seed", 0)
    model = out / ("model" if seed == 0 else f"model-seed{seed}")
    if not (model / "model_index.json").is_file():
        log(f"[1/4] writing the tiny preset (random weights, real classes, seed {seed}) -> {model}")
        write_preset("tiny", model, seed=seed)
    if getattr(args, "task", "text2img") != "text2img":
        from ..export.task_demo import run_task_demo

        return run_task_demo(args.task, model, out, args.prompt, log)
    log(f"[2/4] exporting to ONNX -> {out / 'artifacts'}")
    export_artifacts(open_model_dir(model), out / "artifacts", log=log)
    argv = ["--artifacts", str(out / "artifacts"), "--model", str(model), "--prompt", args.prompt,
            "--steps", "12", "--height", "64", "--width", "128", "--seed", "0"]
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
    p.add_argument("--artifacts", required=True, metavar="ART")
    add_generation_args(p)
    add_backend_args(p)
    p.add_argument("--model", metavar="DIR", help="model folder (only for --backend torch)")
    p.add_argument("--out", required=True, metavar="PATH.png")
    from .task_commands import add_task_args

    add_task_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("parity", help="runtime vs diffusers: per component, teacher-forced and end to end")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--artifacts", required=True, metavar="ART")
    add_generation_args(p)
    add_backend_args(p, ("ort", "trt", "openvino"))
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--report", metavar="DIR", help="write report.md with side-by-side images and heat maps")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="median per-stage latency: runtime vs diffusers, same run "
                                     "(--precision int8: also the int8 vs fp32 U-Net)")
    p.add_argument("--artifacts", required=True, metavar="ART")
    p.add_argument("--model", required=True, metavar="DIR")
    add_generation_args(p)
    add_backend_args(p, ("ort", "trt", "openvino"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--also", action="append", metavar="BACKEND:PRECISION",
                   help="time another runtime configuration in the same interleaved run, e.g. openvino:bf16")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="tiny preset -> export -> generate -> parity, on a fresh install")
    p.add_argument("--out", default="k3trt-demo", metavar="DIR")
    p.add_argument("--prompt", default="a red fox in a snowy forest, watercolor")
    p.add_argument("--task", choices=["text2img", "img2img", "inpaint"], default="text2img",
                   help="img2img: vs diffusers.Kandinsky3Img2ImgPipeline at strength 0.6; inpaint: vs the "
                        "official-semantics torch reference (docs/tasks.md); reports show input, mask, output")
    p.add_argument("--model-seed", type=int, default=0, help="weight seed of the tiny preset (default 0)")
    p.set_defaults(func=cmd_demo)


logging.basicConfig(level=os.environ.get("K3TRT_LOG", "WARNING"), format="%(levelname)s: %(message)s")
