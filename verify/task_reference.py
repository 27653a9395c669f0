"""PyTorch references for the image tasks, written from the sources in docs/tasks.md, independent of the runtime.

- image to image: diffusers' own `Kandinsky3Img2ImgPipeline` (diffusers layout only);
- inpainting: `inpaint_reference`, the official `Kandinsky3InpaintingPipeline` + `BaseDiffusion.p_sample_loop`
  restated over the diffusers modules (T5, the 9-channel U-Net with its projection, MoVQ). It shares no code
  with the runtime's inpainting path: only the torch modules and the tokenizer.
- Flash: `flash_reference`, the official `p_sample_loop(gan=True)` restated the same way.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_LENGTH = 128


def load_img2img_reference(model_dir: str | Path):
    """diffusers.Kandinsky3Img2ImgPipeline in fp32 on the CPU (safetensors only)."""
    from diffusers import Kandinsky3Img2ImgPipeline
    from k3trt.export.sources import open_model_dir

    source = open_model_dir(model_dir)
    pipe = Kandinsky3Img2ImgPipeline.from_pretrained(str(source.root), torch_dtype=torch.float32,
                                                     use_safetensors=True, variant=source.variant)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_img2img_reference(pipe, prompt: str, image, *, strength: float, steps: int, guidance: float, seed: int,
                          negative_prompt: str | None = None, num_images: int = 1) -> np.ndarray:
    """(N, H, W, 3) in [0, 1]; `image` is a PIL image (diffusers preprocesses it itself)."""
    with torch.no_grad():
        out = pipe(prompt, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                   negative_prompt=negative_prompt, num_images_per_prompt=num_images,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return np.asarray(out.images)


# ----------------------------------------------------------------------------------------- official semantics
def _cosine_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """`get_named_beta_schedule('cosine', n)` then cumprod(1 - betas), float32."""
    bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


class OfficialModules:
    """T5 encoder, a U-Net (with its projection and null embedding) and the MoVQ of one source, fp32."""

    def __init__(self, source, unet_folder: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
        self.text_encoder = source.load("text_encoder")
        self.unet = source.load(unet_folder)
        self.null_embedding = source.null_embedding(unet_folder)
        self.movq = source.load("movq")

    def context(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 -> projection -> zero where the mask is 0 -> cut to max(mask.sum) + 1 (condition_encoders.py)."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt")
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        context = self.unet.encoder_hid_proj(hidden)
        mask = tokens.attention_mask
        context[mask == 0] = torch.zeros_like(context[mask == 0])
        length = int(mask.sum(-1).max()) + 1
        return context[:, :length], mask[:, :length]

    def null_context(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_guidance's unconditional branch: zeros, the null embedding at position 0, mask 1 only there."""
        uncond, uncond_mask = torch.zeros_like(context), torch.zeros_like(mask)
        uncond[:, 0] = self.null_embedding
        uncond_mask[:, 0] = 1
        return uncond, uncond_mask

    def eps(self, x: torch.Tensor, t: int, context, mask) -> torch.Tensor:
        """The U-Net on an already projected context (the official UNet has no projection inside)."""
        projection, self.unet.encoder_hid_proj = self.unet.encoder_hid_proj, torch.nn.Identity()
        try:
            timestep = torch.full((x.shape[0],), float(t))
            return self.unet(x, timestep, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample
        finally:
            self.unet.encoder_hid_proj = projection


def _p_sample(x, t, s, eps, ac, generator, percentile=0.95, eta=1.0):
    """BaseDiffusion.p_mean_variance + p_sample for one (t, s) pair."""
    a_t, a_s = ac[t], ac[s]
    x0 = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    q = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), percentile, dim=-1).clip(min=1.0)
    q = q.reshape(-1, 1, 1, 1)
    x0 = torch.clip(x0, -q, q) / q
    eps = (x - torch.sqrt(a_t) * x0) / torch.sqrt(1 - a_t)
    var = torch.sqrt(eta * (1 - a_t / a_s) * (1 - a_s) / (1 - a_t))
    mean = torch.sqrt(a_s) * x0 + torch.sqrt(1 - a_s - var ** 2) * eps
    noise = torch.randn(x.shape, generator=generator)
    return mean + float(s != 0) * var * noise


def inpaint_reference(modules: OfficialModules, prompt: str, image: torch.Tensor, user_mask: torch.Tensor, *,
                      steps: int = 50, guidance: float = 4.0, seed: int = 0,
                      preserve_unmasked: bool = True) -> np.ndarray:
    """`image` (1, 3, H, W) in [-1, 1]; `user_mask` (1, 1, H, W), 1 = repaint. Returns (1, H, W, 3) in [0, 1]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        context, mask = modules.context([prompt])
        uncond, uncond_mask = modules.null_context(context, mask)
        keep = 1 - user_mask  # prepare_batch: mask = 1 - user mask
        masked_latent = modules.movq.encode(image.masked_fill((1 - keep).bool(), 0)).latents
        keep_latent = F.interpolate(keep, size=masked_latent.shape[-2:])  # default mode: nearest
        ac = _cosine_alphas_cumprod()
        times = list(range(999, 0, -1000 // steps)) + [0]
        x = torch.randn((1, 4, *masked_latent.shape[-2:]), generator=generator)
        for t, s in zip(times[:-1], times[1:]):
            large = torch.cat([torch.cat([x, x]), keep_latent.repeat(2, 1, 1, 1), masked_latent.repeat(2, 1, 1, 1)], 1)
            out = modules.eps(large, t, torch.cat([context, uncond]), torch.cat([mask, uncond_mask]))
            cond, unc = out.chunk(2)
            x = _p_sample(x, t, s, (guidance + 1.0) * cond - guidance * unc, ac, generator)
        decoded = modules.movq.decode(x, force_not_quantize=True).sample
    result = torch.clip((decoded + 1.0) / 2.0, 0.0, 1.0)
    if preserve_unmasked:
        result = torch.where(keep.bool(), (image + 1.0) / 2.0, result)
    return result.permute(0, 2, 3, 1).numpy()


def flash_reference(modules: OfficialModules, prompt: str, *, height: int, width: int, seed: int = 0) -> np.ndarray:
    """`p_sample_loop(gan=True)` at t = 979, 729, 479, 229; no guidance. Returns (1, H, W, 3) in [0, 1]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    ac = _cosine_alphas_cumprod()
    with torch.no_grad():
        context, mask = modules.context([prompt])
        x = torch.randn((1, 4, height // 8, width // 8), generator=generator)
        for t in range(979, 0, -250):
            x_t = torch.sqrt(ac[t]) * x + torch.sqrt(1 - ac[t]) * torch.randn(x.shape, generator=generator)
            eps = modules.eps(x_t, t, context, mask)
            x = (x_t - torch.sqrt(1 - ac[t]) * eps) / torch.sqrt(ac[t])
        decoded = modules.movq.decode(x, force_not_quantize=True).sample
    return torch.clip((decoded + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).numpy()
