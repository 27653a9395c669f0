"""Which U-Net input shapes give non-finite outputs under OpenVINO's CPU bf16 inference hint: a scan over batch
size and text length with random inputs (all text tokens unmasked), one compile per shape, fp32 beside it.

    python3 -m k3trt.verify.experiments.openvino_bf16_nan_scan --artifacts small-art --resolution 256x256 --json docs/results/openvino_bf16_nan_scan.json

The runtime refuses a non-finite U-Net output with NonFiniteError at the step it happens; this scan shows which
shapes do it on the machine at hand, for a report upstream or a choice of precision.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--resolution", default="256x256", help="WxH in pixels")
    parser.add_argument("--batches", default="1,2,3,4")
    parser.add_argument("--tokens", default="8,15,16,17,32")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    import openvino
    import torch

    from k3trt.runtime.cpuinfo import cpu_info
    from k3trt.runtime.pipeline import Pipeline

    width, height = (int(v) for v in args.resolution.split("x"))
    pipes = {p: Pipeline.from_artifacts(args.artifacts, "openvino", precision=p) for p in ("fp32", "bf16")}
    text_width = next(s.shape[-1] for s in pipes["fp32"].manifest.onnx("unet").inputs
                      if s.name == "encoder_hidden_states")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator().manual_seed(0)
            feeds = {"sample": torch.randn(batch, 4, height // 8, width // 8, generator=g),
                     "timestep": torch.full((batch,), 500.0),
                     "encoder_hidden_states": torch.randn(batch, tokens, text_width, generator=g),
                     "encoder_attention_mask": torch.ones(batch, tokens)}
            finite = {p: float(torch.isfinite(next(iter(pipe.backend._run("unet", feeds).values()))).float().mean())
                      for p, pipe in pipes.items()}
            rows.append({"batch": batch, "tokens": tokens, "finite_fraction": finite})
            print(f"batch {batch}, {tokens} tokens: finite fraction fp32 {finite['fp32']:.3f}, bf16 {finite['bf16']:.3f}",
                  flush=True)
    result = {"rows": rows, "resolution": args.resolution, "openvino": openvino.__version__,
              "cpu": cpu_info().describe(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "command": "python3 -m k3trt.verify.experiments.openvino_bf16_nan_scan " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
