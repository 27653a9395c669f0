"""`k3trt generate`: one request (text to image or an image task) from an artifact directory to image files."""
from __future__ import annotations

from k3trt.cli import arguments
from k3trt.cli.arguments import (
    add_backend_args,
    add_generation_args,
    checked_request,
    generation_kwargs,
    log,
    output_paths,
    progress_callback,
)
from k3trt.cli.task_args import add_task_args, run_task, task_of, task_steps
from k3trt.writing.ownership import save_image


def cmd_generate(args) -> int:
    from k3trt.runtime.pipeline import to_pil

    task = task_of(args)  # contradictory task flags fail before anything loads
    request = checked_request(args)
    paths = output_paths(args.out, request.latent_shape[0])
    pipe = arguments.open_pipeline(args)
    kwargs = generation_kwargs(args)
    if task == "text2img":
        images = pipe.run(request, callback=progress_callback(request.steps))
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


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from an artifact directory")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    add_generation_args(p)
    add_backend_args(p)
    p.add_argument("--model", metavar="DIR", help="model folder (only for --backend torch)")
    p.add_argument("--out", required=True, metavar="PATH.png", help="image file (.png, .jpg, .webp); with several "
                   "images PATH-0.png, PATH-1.png, ...; an existing file is replaced only if k3trt wrote it")
    add_task_args(p)
    p.set_defaults(func=cmd_generate)
