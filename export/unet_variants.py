"""The Kandinsky 3 U-Net variants beside the base model: the 9-channel inpainting U-Net and the 3.1 Flash U-Net.

diffusers has no class for them: `Kandinsky3UNet` ties its output channels to its input channels, and the
inpainting U-Net takes 9 channels (latents 4, mask 1, masked-image latents 4) but predicts 4. So a variant is a
`Kandinsky3UNet(in_channels=4)` whose `conv_in` is replaced by a `sample_channels`-input convolution, exactly the
official `UNet(num_channels=9, out_channels=4)` (`kandinsky3/__init__.py: get_inpainting_unet`).

In the diffusers layout a variant is a folder (`unet_inpainting/`, `unet_flash/`) holding the diffusers config
plus `k3trt_sample_channels`, `diffusion_pytorch_model.safetensors` and `null_embedding.safetensors` (the learned
unconditional embedding the official pipelines put at context position 0; see docs/tasks.md).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..runtime.errors import ModelSourceError

WEIGHTS = "diffusion_pytorch_model.safetensors"
NULL_EMBEDDING = "null_embedding.safetensors"
SAMPLE_CHANNELS_KEY = "k3trt_sample_channels"
VARIANT_FOLDERS = {"unet_inpainting": 9, "unet_flash": 4}  # folder -> U-Net input channels


def build_unet(config: dict, sample_channels: int = 4):
    """A Kandinsky3UNet from a diffusers config with a `sample_channels`-input conv_in (output stays 4)."""
    import torch
    from diffusers import Kandinsky3UNet

    known = {k: v for k, v in config.items() if not k.startswith("_") and k != SAMPLE_CHANNELS_KEY}
    unet = Kandinsky3UNet(**{**known, "in_channels": 4})
    if sample_channels != 4:
        init = unet.conv_in.out_channels
        unet.conv_in = torch.nn.Conv2d(sample_channels, init, kernel_size=3, padding=1)
    return unet.eval()


def save_variant(folder: Path, unet, null_embedding, *, sample_channels: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config.update({"_class_name": "Kandinsky3UNet", SAMPLE_CHANNELS_KEY: sample_channels})
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    save_file({"null_embedding": null_embedding.contiguous()}, folder / NULL_EMBEDDING, metadata={"format": "pt"})


def load_variant(folder: Path):
    """(U-Net in eval mode, null embedding) from a variant folder written by `save_variant` (safetensors only)."""
    from safetensors.torch import load_file

    config_path, weights = folder / "config.json", folder / WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise ModelSourceError(f"{str(folder)!r} lacks config.json or {WEIGHTS}",
                               fix="rewrite the preset (`k3trt preset tiny --out DIR`)")
    config = json.loads(config_path.read_text())
    unet = build_unet(config, int(config.get(SAMPLE_CHANNELS_KEY, 4)))
    unet.load_state_dict(load_file(weights), strict=True)
    null = load_file(folder / NULL_EMBEDDING)["null_embedding"] if (folder / NULL_EMBEDDING).is_file() else None
    return unet.eval(), null
