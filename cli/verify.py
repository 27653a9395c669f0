"""`k3trt parity | bench | demo`: the runtime against the PyTorch reference, timed or compared, and the
one-command demo that chains preset -> export -> generate -> parity."""
from __future__ import annotations

import argparse
from pathlib import Path

from k3trt.cli import arguments, generate
from k3trt.cli.arguments import (
    add_backend_args,
    add_generation_args,
    check_report_args,
    checked_request,
    generation_kwargs,
    log,
    progress_callback,
)
from k3trt.contract.arguments import MAX_REPEATS, check_int, check_text
from k3trt.contract.errors import InvalidArgumentError
from k3trt.writing.ownership import claim_output_dir, owner_kind, save_json


def run_parity_command(args, report_dir: str | None) -> "object":
    from k3trt.verify.parity import compare_runs, format_table, write_report
    from k3trt.verify.torch_reference import load_reference, run_reference

    check_report_args(args)
    request = checked_request(args)
    pipe = arguments.open_pipeline(args, model_dir=args.model)
    log(f"runtime ({args.backend}, {args.precision or pipe.backend.baseline}): {request.steps} steps ...")
    recorded: list = []
    images = pipe.run(request, output_type="np", recorder=recorded, callback=progress_callback(request.steps, "runtime"))
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
    from k3trt.verify.bench import format_bench, run_benchmark, runtime_runner, unet_int8_vs_fp32
    from k3trt.verify.bench_stats import load_average, machine_info, reliability_warnings, utc_now, versions
    from k3trt.verify.torch_reference import load_reference

    load_before = load_average()  # before anything loads: what other processes put on the machine
    check_int("--repeats", args.repeats, 1, MAX_REPEATS, "e.g. --repeats 3 (medians need a few)")
    check_report_args(args)
    request = checked_request(args)
    kwargs = generation_kwargs(args)
    pipe = arguments.open_pipeline(args)
    backend = pipe.backend.name  # what --backend auto became
    int8 = backend in ("ort", "openvino") and pipe.backend.effective_precision("unet") == "int8"
    extra = {}
    if int8:  # same run, same request, same backend: the fp32 pipeline's U-Net for comparison
        fp32_pipe = arguments.open_pipeline(argparse.Namespace(**{**vars(args), "backend": backend,
                                                                  "precision": "fp32"}))
        extra["runtime_fp32"] = runtime_runner(fp32_pipe, kwargs)
    also = {f"{b} {p}": arguments.open_pipeline(argparse.Namespace(**{**vars(args), "backend": b, "precision": p}))
            for b, p in (parse_also(item) for item in args.also or [])}
    choice = pipe.backend.auto_choice
    if choice is not None:
        log(f"auto chose {choice.backend}" + (f", {choice.precision}" if choice.precision else "")
            + f": {choice.reason}")
    log(f"benchmarking {args.repeats} interleaved repeats at {request.width}x{request.height}, {request.steps} "
        f"steps, torch threads {torch.get_num_threads()}, runtime backend {backend} ...")
    result = {"date": utc_now(), "request": kwargs, "repeats": args.repeats, "backend": backend,
              "precision": pipe.backend.effective_precision("unet"),
              "auto": choice.to_dict() if choice is not None else None,
              **run_benchmark(pipe, load_reference(args.model), request, kwargs, repeats=args.repeats,
                              threads=args.threads, extra=extra, also=also)}
    if int8:
        result["unet_int8_vs_fp32"] = unet_int8_vs_fp32(result["runtime"], result.pop("runtime_fp32"))
    result["machine"] = machine_info(result["limit"]["threads"], load_before, load_average())
    result["versions"] = versions()
    result["warnings"] = reliability_warnings(result["dispersion"], args.repeats, result["machine"])
    print(format_bench(result))
    if args.json:
        save_json(result, Path(args.json))
    return 0


def parse_also(item: str) -> tuple[str, str]:
    backend, _, precision = item.partition(":")
    if backend not in ("auto", "ort", "openvino", "trt") or not precision:
        raise InvalidArgumentError(f"--also {item!r}", accepted="BACKEND:PRECISION with BACKEND ort, openvino or trt",
                                   fix="e.g. --also openvino:bf16 --also openvino:fp32")
    return backend, precision


def cmd_demo(args) -> int:
    """tiny preset -> export -> generate -> parity, printing where the image and the report are."""
    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir
    from k3trt.export.writer import export_artifacts

    check_text("--prompt", args.prompt)  # the empty prompt is a prompt, as in diffusers (docs/reliability.md)
    out = claim_output_dir(args.out, "demo")  # new, empty, or an earlier demo: nothing else is written into
    seed = getattr(args, "model_seed", 0)
    model = out / ("model" if seed == 0 else f"model-seed{seed}")
    if owner_kind(model) != "preset" or not (model / "model_index.json").is_file():
        log(f"[1/4] writing the tiny preset (random weights, real classes, seed {seed}) -> {model}")
        write_preset("tiny", model, seed=seed, force=True)  # replaces only a preset k3trt wrote
    if getattr(args, "task", "text2img") != "text2img":
        from k3trt.verify.task_demo import run_task_demo

        return run_task_demo(args.task, model, out, args.prompt, log)
    log(f"[2/4] exporting to ONNX -> {out / 'artifacts'}")
    export_artifacts(open_model_dir(model), out / "artifacts", log=log)
    argv = ["--artifacts", str(out / "artifacts"), "--model", str(model), "--prompt", args.prompt,
            "--steps", "12", "--resolution", "128x64", "--seed", "0"]
    log("[3/4] generating with the lean runtime (ONNX Runtime)")
    gen = _parse(["generate", *argv[:2], *argv[4:], "--out", str(out / "demo.png")])
    generate.cmd_generate(gen)
    log("[4/4] parity against diffusers.Kandinsky3Pipeline")
    par = _parse(["parity", *argv, "--report", str(out / "report")])
    report = run_parity_command(par, par.report)
    print(f"image:  {out / 'demo.png'}\nreport: {out / 'report' / 'report.md'}")
    return 0 if report.ok else 1


def _parse(argv: list[str]) -> argparse.Namespace:
    """The demo's own generate/parity steps, parsed as the user would type them."""
    parser = argparse.ArgumentParser(prog="k3trt")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.register(sub)
    register(sub)
    return parser.parse_args(argv)


def register(sub) -> None:
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

    p = sub.add_parser("bench", help="per-stage latency (median and dispersion): runtime vs diffusers, same run, "
                                     "against the fp32 floor (--precision int8: also the int8 vs fp32 U-Net)")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--model", required=True, metavar="DIR", help="the model folder the artifacts were exported "
                   "from (diffusers layout), for the reference run")
    add_generation_args(p)
    add_backend_args(p, ("auto", "ort", "trt", "openvino"))
    p.add_argument("--repeats", type=int, default=3, help=f"timed repeats per side after a warm-up, 1..{MAX_REPEATS}")
    p.add_argument("--also", action="append", metavar="BACKEND:PRECISION",
                   help="time another runtime configuration in the same interleaved run, e.g. openvino:bf16")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON: medians and dispersion per stage, "
                   "the fp32 floor, what auto chose, the machine (load before/after), versions, warnings; "
                   "`python3 -m k3trt.verify.perf_page` renders such files into docs/performance.md")
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
