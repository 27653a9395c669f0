"""The text-to-image loop as task-shaped stages: encode prompt -> prepare latents -> denoise -> decode.

Each stage is a function over a backend, so tasks (text-to-image, image-to-image, inpainting) and the
step-level batching engine compose the same pieces. A request's place in the loop is a `DenoiseState`: its own
scheduler (timesteps and their predecessors), generator, latents and conditioning. Nothing here is shared
between requests, so states at different timesteps can share one U-Net call (`run_unet`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
from k3trt.contract.errors import InvalidArgumentError, K3TRTError, NonFiniteError
from k3trt.runtime.backends.base import Backend


class GenerationCancelled(K3TRTError):
    """The per-step callback, a deadline or the client asked to stop."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    index: int  # 0-based step
    total: int
    timestep: int
    latents: torch.Tensor


# callback(StepInfo) -> None/False: go on; True: cancel; a tensor: replace the latents (same shape)
StepCallback = Callable[[StepInfo], "bool | torch.Tensor | None"]


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The U-Net's context for one request: rows [uncond..., cond...] when guided, else [cond...]."""
    context: torch.Tensor  # (rows, L, D)
    mask: torch.Tensor  # (rows, L) float 0/1
    guided: bool

    @property
    def length(self) -> int:
        return int(self.context.shape[1])


def check_finite(tensor: torch.Tensor, stage: str) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{stage} produced {bad} NaN/Inf value(s)",
                             fix="check the engine precision (fp16 overflow?) or run `k3trt parity`")
    return tensor


# ------------------------------------------------------------------------------------------ encode
def prompt_texts(request) -> list[str]:
    """The texts one request sends to the text encoder: prompts, then negatives when guided."""
    negatives = list(request.negative_prompts or []) if request.guided else []  # ignored without CFG
    return list(request.prompts) + negatives


def encode_prompts(backend: Backend, tokenizer, requests: Sequence) -> list[Conditioning]:
    """One text-encoder call for all `requests` (rows are independent), split back per request."""
    texts = [text for request in requests for text in prompt_texts(request)]
    ids, mask = tokenizer(texts)
    hidden = backend.run("text_encoder", {"input_ids": ids.to(backend.device),
                                          "attention_mask": mask.to(backend.device)})
    hidden = check_finite(hidden["last_hidden_state"], "text_encoder").float()
    mask = mask.to(hidden.device)
    out, row = [], 0
    for request in requests:
        n = len(prompt_texts(request))
        out.append(conditioning(request, hidden[row:row + n], mask[row:row + n]))
        row += n
    return out


def conditioning(request, hidden: torch.Tensor, mask: torch.Tensor) -> Conditioning:
    """diffusers' encode_prompt after the encoder: cut context, zero padding, [uncond, cond] when guided."""
    n_prompts = len(request.prompts)
    cond, cond_mask = hidden[:n_prompts], mask[:n_prompts]
    length = int(cond_mask.sum(-1).max()) + 1  # cut context: the longest prompt plus one position
    # zero the padded positions (where, not a product: an Inf there must not become NaN), then cut
    cond = torch.where(cond_mask[..., None] != 0, cond, 0.0)[:, :length]
    cond_mask = cond_mask[:, :length]
    n = request.num_images
    # diffusers repeats embeddings per prompt (p0 p0 p1 p1) but masks per batch (m0 m1 m0 m1); reproduced
    context = cond.repeat(1, n, 1).view(n_prompts * n, cond.shape[1], -1)
    context_mask = cond_mask.repeat(n, 1)
    if not request.guided:
        return Conditioning(context, context_mask.float(), False)
    if request.negative_prompts is None:  # unconditional = zero embeddings and an all-zero mask
        uncond, uncond_mask = torch.zeros_like(context), torch.zeros_like(context_mask)
    else:
        neg_mask = mask[n_prompts:, :length]
        neg = hidden[n_prompts:, :length] * neg_mask[..., None]
        uncond = neg.repeat(1, n, 1).view(n_prompts * n, length, -1)
        uncond_mask = neg_mask.repeat(n, 1)
    return Conditioning(torch.cat([uncond, context]), torch.cat([uncond_mask, context_mask]).float(), True)


# ------------------------------------------------------------------------------------------ latents
def prepare_latents(shape: tuple[int, ...], generator: torch.Generator | None, *, latents: torch.Tensor | None = None,
                    init_noise_sigma: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pure noise from `generator` (drawn on the CPU, as diffusers does with a CPU generator), or given latents."""
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise InvalidArgumentError(f"latents of shape {tuple(latents.shape)}", accepted=f"shape {tuple(shape)}")
        return latents.to(device, torch.float32)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    return noise * init_noise_sigma


# ------------------------------------------------------------------------------------------ denoise
class DenoiseState:
    """One request in the denoising loop: its scheduler, timesteps, latents, guidance and generator."""

    component = "unet"  # the U-Net component it runs (a task's state may run another: tasks.MaskedDenoiseState)

    def __init__(self, scheduler, timesteps: Sequence[int], latents: torch.Tensor, cond: Conditioning,
                 guidance: float, generator: torch.Generator | None):
        self.scheduler, self.timesteps = scheduler, list(timesteps)
        self.latents, self.cond, self.guidance, self.generator = latents, cond, float(guidance), generator
        self.index = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def timestep(self) -> int:
        return self.timesteps[self.index]

    @property
    def latent_size(self) -> tuple[int, int]:
        return int(self.latents.shape[-2]), int(self.latents.shape[-1])

    def unet_feeds(self) -> dict[str, torch.Tensor]:
        sample = torch.cat([self.latents, self.latents]) if self.cond.guided else self.latents
        return {"sample": sample,
                "timestep": torch.full((sample.shape[0],), float(self.timestep), device=sample.device),
                "encoder_hidden_states": self.cond.context, "encoder_attention_mask": self.cond.mask}

    def advance(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Guidance ((g + 1) * cond - g * uncond, as diffusers) and one scheduler step; returns the new latents."""
        if self.cond.guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = (self.guidance + 1.0) * cond - self.guidance * uncond
        self.latents = self.scheduler.step(noise_pred, self.timestep, self.latents, generator=self.generator)
        self.index += 1
        return self.latents

    def after_step(self, callback: StepCallback | None) -> None:
        """Run the step callback: it may cancel (True) or replace the latents (a tensor of the same shape)."""
        if callback is None:
            return
        i, total = self.index - 1, len(self.timesteps)
        verdict = callback(StepInfo(i, total, self.timesteps[i], self.latents))
        if isinstance(verdict, torch.Tensor):
            if verdict.shape != self.latents.shape:
                raise InvalidArgumentError(f"the step callback returned latents of shape {tuple(verdict.shape)}",
                                           accepted=f"shape {tuple(self.latents.shape)}")
            self.latents = verdict.to(self.latents.device, self.latents.dtype)
        elif verdict:
            raise GenerationCancelled(f"cancelled by the callback after step {i + 1}/{total}")


def context_lengths_fit(lengths: Sequence[int], max_length: int) -> int | None:
    """The common context length for states of these lengths, or None if it would exceed `max_length`.

    Padding a context with masked zeros is NOT exact for this U-Net: its attention pooling takes the mean of the
    projected context over all L positions (masked ones included). Tiling it k times is exact (the mean of k
    copies is the mean; the copies are masked, so attention weights are unchanged), hence the least common
    multiple. Measured in tests/runtime/test_rt_batching.py."""
    common = 1
    for length in set(lengths):
        common = common * length // math.gcd(common, length)
        if common > max_length:
            return None
    return common


def tile_context(cond: Conditioning, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cond` stretched to `length` (a multiple of its own) by masked copies of itself."""
    k = length // cond.length
    if k == 1:
        return cond.context, cond.mask
    context = cond.context.repeat(1, k, 1)
    mask = torch.cat([cond.mask, torch.zeros_like(cond.mask).repeat(1, k - 1)], dim=1)
    return context, mask


def run_unet(backend: Backend, states: Sequence[DenoiseState], *, label: str = "unet") -> list[torch.Tensor]:
    """One U-Net call over every state (same latent size; each its own timestep and context), split back."""
    feeds = [s.unet_feeds() for s in states]
    component = states[0].component
    if any(s.component != component for s in states):
        raise InvalidArgumentError("states of different U-Nets in one call",
                                   accepted=f"states that all run {component}", fix="batch them per U-Net")
    if len(states) == 1:
        noise = backend.run(component, feeds[0])["noise_pred"]
        return [check_finite(noise, label)]
    length = context_lengths_fit([s.cond.length for s in states], 1 << 30)
    tiled = [tile_context(s.cond, length) for s in states]
    batch = {"sample": torch.cat([f["sample"] for f in feeds]),
             "timestep": torch.cat([f["timestep"] for f in feeds]),
             "encoder_hidden_states": torch.cat([c for c, _ in tiled]),
             "encoder_attention_mask": torch.cat([m for _, m in tiled])}
    noise = check_finite(backend.run(component, batch)["noise_pred"], label)
    return list(noise.split([f["sample"].shape[0] for f in feeds]))


def denoise(backend: Backend, state: DenoiseState, callback: StepCallback | None = None,
            recorder: list | None = None) -> torch.Tensor:
    """Run `state` to its last timestep, one U-Net call per step."""
    while not state.done:
        i, t = state.index, state.timestep
        (noise,) = run_unet(backend, [state], label=f"unet at step {i} (t={t})")
        if recorder is not None:
            sample = state.unet_feeds()["sample"]
            recorder.append({"step": i, "timestep": t, "sample": sample.cpu(), "noise_pred": noise.cpu()})
        state.advance(noise)
        state.after_step(callback)
    return state.latents


# ------------------------------------------------------------------------------------------ decode
def decode_latents(backend: Backend, latents: torch.Tensor) -> np.ndarray:
    """MoVQ decode -> float images (N, H, W, 3) in [0, 1]."""
    image = backend.run("movq_decoder", {"latents": latents})["image"]
    image = check_finite(image, "movq_decoder")
    return (image.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
