"""The reference point for the bf16 bound: diffusers' own bf16 (torch.autocast on the CPU) against its fp32.

Same model, prompt, seed and steps; PSNR of the bf16-autocast image against the fp32 image. Autocast runs
Conv/Linear/MatMul in bf16 and keeps norms, softmax and element-wise math in fp32.

    python3 verify/experiments/diffusers_bf16_autocast.py --model small --resolution 256x256
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def generate(pipe, prompt: str, size: int, steps: int, *, autocast: bool) -> tuple[np.ndarray, float]:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        images = pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                      output_type="np").images
    return np.asarray(images, np.float64), time.perf_counter() - start


def main() -> None:
    from diffusers import Kandinsky3Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers-layout folder (e.g. `k3trt preset small`)")
    parser.add_argument("--resolution", default="256x256", help="WxH in pixels (square)")
    parser.add_argument("--prompt", default="a red fox in a snowy forest, watercolor")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.model) / "model_index.json").is_file():  # before diffusers tries the Hub
        parser.error(f"--model {args.model!r} holds no model_index.json: pass a diffusers-layout folder")
    width, height = (int(v) for v in args.resolution.split("x"))
    if width != height:
        raise SystemExit(f"--resolution {args.resolution}: square resolutions only")
    torch.set_num_threads(args.threads)
    pipe = Kandinsky3Pipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fp32, fp32_s = generate(pipe, args.prompt, width, args.steps, autocast=False)
    bf16, bf16_s = generate(pipe, args.prompt, width, args.steps, autocast=True)
    psnr = 10 * np.log10(1.0 / np.mean((fp32 - bf16) ** 2))
    print(f"{args.resolution}, {args.steps} steps: diffusers bf16 autocast vs its fp32: PSNR {psnr:.2f} dB "
          f"(fp32 {fp32_s:.1f} s, autocast {bf16_s:.1f} s)")


if __name__ == "__main__":
    main()
