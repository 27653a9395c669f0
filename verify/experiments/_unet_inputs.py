"""What both U-Net experiments share: their command line, the fp32 graph from the manifest, and one guided
step's inputs."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from k3trt.contract.manifest import Manifest


def unet_graph(artifacts: str) -> str:
    manifest = Manifest.load(artifacts)
    return str(manifest.path(manifest.onnx("unet", "fp32").graph.path))


def example_feeds(artifacts: str, resolution: str, *, batch: int = 2, tokens: int = 16) -> dict:
    """Latents for `resolution` (WxH pixels, square), a mid-trajectory timestep, random text states of the
    width the manifest records. Batch 2: classifier-free guidance runs both halves in one call."""
    width, height = (int(v) for v in resolution.split("x"))
    if width != height:
        raise SystemExit(f"--resolution {resolution}: square resolutions only")
    spec = {s.name: s for s in Manifest.load(artifacts).onnx("unet", "fp32").inputs}
    text_width = spec["encoder_hidden_states"].shape[-1]
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((batch, 4, width // 8, width // 8)).astype(np.float32),
            "timestep": np.full(batch, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, tokens, text_width)).astype(np.float32),
            "encoder_attention_mask": np.ones((batch, tokens), np.float32)}


def arguments(doc: str, *, repeats: int) -> argparse.Namespace:
    """--artifacts, --resolution, --repeats, --threads; the description is the script docstring's first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--resolution", default="256x256", help="WxH in pixels (square latents only)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.artifacts) / "manifest.json").is_file():  # before anything loads
        parser.error(f"--artifacts {args.artifacts!r} holds no manifest.json: pass a folder `k3trt export` wrote")
    return args
