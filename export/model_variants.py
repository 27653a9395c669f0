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

import torch
from k3trt.contract.errors import ModelSourceError

WEIGHTS = "diffusion_pytorch_model.safetensors"
NULL_EMBEDDING = "null_embedding.safetensors"
SAMPLE_CHANNELS_KEY = "k3trt_sample_channels"
VARIANT_FOLDERS = {"unet_inpainting": 9, "unet_flash": 4}  # folder -> U-Net input channels


def build_unet(config: dict, sample_channels: int = 4):
    """A Kandinsky3UNet from a diffusers config with a `sample_channels`-input conv_in (output stays 4)."""
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
    unet.k3trt_null_embedding = null  # read by the export wrapper (official_unet)
    return unet.eval(), null


_IDENTITY = torch.nn.Identity()


class OfficialUNet(torch.nn.Module):
    """The inpainting / Flash U-Net with the official text semantics (docs/tasks.md), same I/O as UNetOnnx.

    - the text projection runs here and positions with mask 0 are zeroed after it (official
      `T5TextConditionEncoder`), not before it (diffusers);
    - a row whose mask is all zero is the unconditional row: it gets the learned null embedding at position
      0 with mask 1 there (official `BaseDiffusion.text_guidance`), so the runtime's conditioning (zero
      context, zero mask for the unconditional branch) stays the same for every U-Net.
    `sample` carries all input channels (9 for inpainting: latents, mask, masked-image latents)."""

    def __init__(self, unet, null_embedding):
        super().__init__()
        self.unet = unet  # not modified: wrapping twice (export, then validation) must give the same module
        dim = unet.encoder_hid_proj.projection_linear.out_features
        null = null_embedding if null_embedding is not None else torch.zeros(dim)
        self.register_buffer("null_embedding", null.reshape(-1).float().clone())

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        mask = encoder_attention_mask
        projection = self.unet.encoder_hid_proj
        context = projection(encoder_hidden_states) * mask[..., None]
        null_row = (mask.sum(-1, keepdim=True) == 0).to(mask.dtype)  # (B, 1)
        first = (torch.arange(mask.shape[1], device=mask.device) == 0).to(mask.dtype)[None]  # (1, L)
        context = context * (1 - null_row[..., None]) + (null_row * first)[..., None] * self.null_embedding
        mask = mask * (1 - null_row) + null_row * first
        self.unet.encoder_hid_proj = _IDENTITY  # the context is projected already (the official UNet has none)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=context, encoder_attention_mask=mask,
                             return_dict=False)[0]
        finally:
            self.unet.encoder_hid_proj = projection



def official_unet(unet, null_embedding=None) -> OfficialUNet:
    """Wrap a variant U-Net (see OfficialUNet) for export and for the torch backend; the null embedding
    defaults to the one its loader attached."""
    if null_embedding is None:
        null_embedding = getattr(unet, "k3trt_null_embedding", None)
    return OfficialUNet(unet, null_embedding).eval()
