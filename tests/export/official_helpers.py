"""Random checkpoints in the official ai-forever/Kandinsky-3 `.pt` layout, for tests.

The key names and shapes come from `data/official_tiny_layout.json`, recorded once by instantiating the official
`kandinsky3.model.unet.UNet` and `kandinsky3.movq.MoVQ` at the tiny preset's sizes; the same file holds those
official modules' outputs for weights filled by `fill_random` (seed 0), so a test can prove that the key mapping
reproduces the official computation without the official code being installed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

DATA = Path(__file__).with_name("data") / "official_tiny_layout.json"
TINY_OVERRIDES = {"unet": {"groups": 8, "attention_head_dim": 16}}  # not stored in the weights


def layout() -> dict:
    return json.loads(DATA.read_text())


def key_shapes(component: str) -> list[tuple[str, tuple[int, ...]]]:
    data = layout()
    if component == "unet_inpainting":
        return [(k, (16, 9, 3, 3) if k == "in_layer.weight" else tuple(s)) for k, s in data["unet"]["keys"]]
    return [(k, tuple(s)) for k, s in data["unet" if component == "unet_flash" else component]["keys"]]


def fill_random(component: str, seed: int = 0) -> dict:
    """The recording's recipe: each key in layout order gets randn * 0.1 from one generator."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in key_shapes(component)}


def projection(seed: int, dim: int = 64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(dim, dim, generator=gen) / dim ** 0.5, "1.weight": torch.ones(dim),
            "1.bias": torch.randn(dim, generator=gen) * 0.1}


def write_official_dir(dest: Path, tiny_model_dir: Path, *, seed: int = 0) -> Path:
    """A complete official-layout folder: three U-Nets, MoVQ, T5 folder with projections, size overrides."""
    dest.mkdir(parents=True, exist_ok=True)
    t5 = dest / "flan_ul2_encoder"
    shutil.copytree(tiny_model_dir / "text_encoder", t5)
    for item in (tiny_model_dir / "tokenizer").iterdir():
        shutil.copy(item, t5 / item.name)
    files = {"unet": ("kandinsky3.pt", "projection.pt"),
             "unet_inpainting": ("kandinsky3_inpainting.pt", "projection_inpainting.pt"),
             "unet_flash": ("kandinsky3_flash.pt", "projection_flash.pt")}
    for offset, (component, (pt, proj)) in enumerate(files.items()):
        null = torch.randn(64, generator=torch.Generator().manual_seed(seed + 100 + offset))
        torch.save({"unet": fill_random(component, seed + offset), "null_embedding": null}, dest / pt)
        torch.save(projection(seed + 10 + offset), t5 / proj)
    torch.save(fill_random("movq", seed), dest / "movq.pt")
    (dest / "k3trt_official.json").write_text(json.dumps(TINY_OVERRIDES))
    return dest
