"""Shared by the TensorRT backend tests on the stand-in: tiny engines built with `k3trt.engines.build`."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

ENGINE_COMPONENTS = "text_encoder,unet,movq_decoder"
PROMPTS = ("fox", "a red fox in a snowy forest", "a very small red fox sitting in deep snow under tall dark pine "
           "trees at dusk, oil painting")  # three context lengths


def build_tiny_engines(source: Path, root: Path, *, precision: str = "fp32", batch: str = "1",
                       components: str = ENGINE_COMPONENTS, resolution: str = "64x64") -> Path:
    """A copy of the tiny artifacts with engines built by the stand-in (the caller installs it)."""
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import make_plan
    from k3trt.contract.manifest import Manifest

    shutil.copytree(source, root)
    manifest = Manifest.load(root)
    plan = make_plan(manifest, precision=precision, components=components, resolutions=[resolution], batch=batch)
    build_engines(plan, manifest, log=lambda *_: None)
    return root


def unet_feeds(batch: int = 2, context: int = 5, side: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, side, side, generator=g), "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": torch.randn(batch, context, 64, generator=g),
            "encoder_attention_mask": torch.ones(batch, context)}
