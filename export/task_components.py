"""Export recipes of the task components: the MoVQ encoder (image to image, inpainting), the 9-channel
inpainting U-Net and the Flash U-Net. What each component *is* lives on its card (runtime/cards.py)."""
from __future__ import annotations

import torch
from k3trt.export.model_variants import official_unet


class MoVQEncoderOnnx(torch.nn.Module):
    """image in [-1, 1] -> latents: `movq.encode(image).latents` (encoder + quant_conv; no quantization, no
    scaling factor), as both diffusers' Kandinsky3Img2ImgPipeline and the official inpainting pipeline use it."""

    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, image):
        return self.movq.encode(image).latents


def movq_encoder_inputs(dims: dict, info: dict, gen: torch.Generator) -> dict:
    shape = (dims["batch"], 3, dims["image_height"], dims["image_width"])
    return {"image": torch.rand(shape, generator=gen) * 2 - 1}


def variant_unet_inputs(channels: int):
    """Sample inputs of a variant U-Net: `channels` input channels (9: latents, 0/1 mask, masked latents), a
    fully-masked (unconditional) row that the wrapper turns into the null-embedding row."""

    def make(dims: dict, info: dict, gen: torch.Generator) -> dict:
        b, h, w, ctx = dims["batch"], dims["height"], dims["width"], dims["context"]
        mask = (torch.rand(b, ctx, generator=gen) > 0.3).to(torch.float32)
        mask[:, 0] = 1.0
        mask[0] = 0.0  # the unconditional row
        sample = torch.randn(b, channels, h, w, generator=gen)
        if channels == 9:
            sample[:, 4] = (torch.rand(b, h, w, generator=gen) > 0.5).to(torch.float32)  # the keep mask
        return {"sample": sample,
                "timestep": torch.randint(1, 1000, (b,), generator=gen).to(torch.float32),
                "encoder_hidden_states": torch.randn(b, ctx, info["context_dim"], generator=gen) * mask[..., None],
                "encoder_attention_mask": mask}

    return make


def variant_unet_wrapper(unet) -> torch.nn.Module:
    return official_unet(unet)
