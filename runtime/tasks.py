"""Image-to-image, inpainting/outpainting and Kandinsky 3.1 Flash, composed from the runtime's stages.

Each task is: check every input and that the artifacts hold the task's components (typed errors, before any
model runs) -> encode the prompt -> prepare latents -> denoise over the task's timesteps -> decode. The
semantics and the sources they were read from are in docs/tasks.md.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.runtime.backends.base import check_shapes
from k3trt.runtime.denoise_loop import (
    DenoiseState,
    GenerationCancelled,
    StepCallback,
    StepInfo,
    check_finite,
    denoise,
    prepare_latents,
)
from k3trt.runtime.images import check_strength, load_image, load_mask, outpaint_canvas, parse_margins
from k3trt.runtime.official_sampler import FlashSampler, OfficialSampler, official_timesteps
from k3trt.runtime.request import make_request

TASK_COMPONENTS = {  # what each task runs beside the text encoder and the MoVQ decoder
    "text2img": ("unet",),
    "img2img": ("unet", "movq_encoder"),
    "inpaint": ("unet_inpainting", "movq_encoder"),
    "flash": ("unet_flash",),
}


def require_components(pipe, task: str) -> None:
    exported = set(pipe.manifest.components())
    missing = [c for c in ("text_encoder", *TASK_COMPONENTS[task], "movq_decoder") if c not in exported]
    if missing:
        source = "the source has them: a diffusers preset or an official checkpoint with " + (
            "kandinsky3_inpainting.pt" if task == "inpaint" else "kandinsky3_flash.pt" if task == "flash"
            else "movq.pt")
        raise ArtifactError(f"the artifacts in {str(pipe.manifest.root)!r} were not exported for {task}: "
                            f"{', '.join(missing)} missing", accepted=f"exported: {', '.join(sorted(exported))}",
                            fix=f"k3trt export --model DIR --out {pipe.manifest.root} --components "
                                f"{','.join(missing)} ({source})")


def single_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"prompt {prompt!r}: image tasks take one prompt",
                                   accepted="a string", fix="call once per prompt (num_images for variations)")
    return prompt


def encode_image(backend, pixels: torch.Tensor) -> torch.Tensor:
    """MoVQ encoder (encoder + quant_conv, no quantization, no scaling) -> latents (B, 4, H/8, W/8)."""
    latents = backend.run("movq_encoder", {"image": pixels.to(backend.device)})["latents"]
    return check_finite(latents, "movq_encoder").float()


def _check_encoder(pipe, pixels: torch.Tensor) -> None:
    check_shapes(pipe.backend.record("movq_encoder"), {"image": tuple(pixels.shape)})


# ----------------------------------------------------------------------------------------- image to image
IMG2IMG_STRENGTH = 0.3  # the default share of the schedule image to image runs


@dataclasses.dataclass(frozen=True)
class Img2ImgInputs:
    """What image to image adds to a Request: the input picture and how much of the schedule runs."""
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    strength: float = IMG2IMG_STRENGTH
    kind: str = dataclasses.field(default="img2img", init=False)


def img2img_inputs(image, strength: float = IMG2IMG_STRENGTH) -> Img2ImgInputs:
    """The checked inputs (a path, PIL image or (H, W, 3) array; strength in (0, 1])."""
    pixels = load_image(image)
    check_strength(strength, 1 << 30)  # the range only; the step count is checked against the request's steps
    return Img2ImgInputs(pixels, float(strength))


def task_generator(request) -> torch.Generator:
    """The image tasks' generator: one per request, seeded as `Pipeline.img2img`/`inpaint` always were."""
    return torch.Generator("cpu").manual_seed(request.seed)


def img2img(pipe, prompt: str, image, *, strength: float = IMG2IMG_STRENGTH, negative_prompt: str | None = None,
            seed: int = 0, steps: int = 25, guidance: float = 3.0, num_images: int = 1,
            callback: StepCallback | None = None, recorder: list | None = None, decode: bool = True) -> np.ndarray:
    """diffusers.Kandinsky3Img2ImgPipeline step for step; float images (N, H, W, 3) in [0, 1] (`decode=False`:
    the final latents (N, 4, H/8, W/8), the MoVQ decoder not run)."""
    prompt = single_prompt(prompt)
    pixels = load_image(image)
    check_strength(strength, steps)
    inputs = Img2ImgInputs(pixels, float(strength))
    request = task_request(inputs, prompt, negative_prompt, seed=seed, steps=steps, guidance=guidance,
                           num_images=num_images)
    check_task(pipe, request, inputs)
    generator = task_generator(request)
    state = start_state(pipe, request, pipe.encode(request), generator, inputs)
    return _decoded(pipe, pipe.denoise(state, callback, recorder), decode)


def _start_img2img(pipe, request, cond, generator, inputs: Img2ImgInputs) -> DenoiseState:
    """MoVQ-encode the image, noise it to the first of the last int(steps * strength) timesteps (get_timesteps)."""
    run = check_strength(inputs.strength, request.steps)
    scheduler, schedule = pipe.new_scheduler(request.steps)
    timesteps = schedule[request.steps - run:]
    latents = encode_image(pipe.backend, inputs.pixels).repeat_interleave(request.latent_shape[0], dim=0)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)  # prepare_latents' one draw
    latents = scheduler.add_noise(latents.cpu(), noise, timesteps[0])
    return pipe.start(request, cond, generator, latents=latents, timesteps=timesteps)


def _decoded(pipe, latents: torch.Tensor, decode: bool) -> np.ndarray:
    return pipe.decode(latents) if decode else latents.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------- inpainting
class MaskedDenoiseState(DenoiseState):
    """A DenoiseState whose U-Net input also carries the mask and the masked-image latents (9 channels)."""

    component = "unet_inpainting"

    def __init__(self, *args, extra: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = extra  # (images, 5, h, w): mask on the latent grid, masked-image latents

    def unet_feeds(self) -> dict[str, torch.Tensor]:
        feeds = super().unet_feeds()
        extra = torch.cat([self.extra, self.extra]) if self.cond.guided else self.extra
        feeds["sample"] = torch.cat([feeds["sample"], extra.to(feeds["sample"].device)], dim=1)
        return feeds


@dataclasses.dataclass(frozen=True)
class InpaintInputs:
    """What inpainting/outpainting adds to a Request: the canvas, the repaint mask, and the paste-back choice."""
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1], on the (possibly extended) canvas
    user_mask: torch.Tensor  # (1, 1, H, W), 1 = repaint
    preserve_unmasked: bool = True  # paste the input's pixels back outside the repaint region
    kind: str = dataclasses.field(default="inpaint", init=False)


def inpaint_inputs(image, mask=None, outpaint: str | dict | None = None, *,
                   preserve_unmasked: bool = True) -> InpaintInputs:
    pixels = load_image(image)
    if outpaint is not None:
        if mask is not None:
            raise InvalidArgumentError("both a mask and outpaint margins were given",
                                       accepted="a mask (inpainting) or margins (outpainting)",
                                       fix="drop --mask: outpainting repaints exactly the new margins")
        margins = parse_margins(outpaint) if isinstance(outpaint, str) else parse_margins(
            ",".join(f"{k}={v}" for k, v in outpaint.items()))
        pixels, user = outpaint_canvas(pixels, margins)
        return InpaintInputs(pixels, user, preserve_unmasked)
    if mask is None:
        raise InvalidArgumentError("inpainting needs a mask", accepted="a mask image (white = repaint)",
                                   fix="pass --mask MASK.png, or --outpaint left=128 to extend the image")
    return InpaintInputs(pixels, load_mask(mask, tuple(pixels.shape[-2:])), preserve_unmasked)


def inpaint(pipe, prompt: str, image, mask=None, *, outpaint: str | dict | None = None,
            negative_prompt: str | None = None, seed: int = 0, steps: int = 50, guidance: float = 4.0,
            num_images: int = 1, preserve_unmasked: bool = True, callback: StepCallback | None = None,
            recorder: list | None = None, decode: bool = True) -> np.ndarray:
    """The official inpainting pipeline (docs/tasks.md); float images (N, H, W, 3) in [0, 1] (`decode=False`:
    the final latents, nothing pasted)."""
    prompt = single_prompt(prompt)
    inputs = inpaint_inputs(image, mask, outpaint, preserve_unmasked=preserve_unmasked)
    request = task_request(inputs, prompt, negative_prompt, seed=seed, steps=steps, guidance=guidance,
                           num_images=num_images)
    check_task(pipe, request, inputs)
    generator = task_generator(request)
    state = start_state(pipe, request, pipe.encode(request), generator, inputs)
    latents = denoise(pipe.backend, state, callback, recorder)
    if not decode:
        return _decoded(pipe, latents, decode)
    return finish_images(inputs, pipe.decode(latents))


def _start_inpaint(pipe, request, cond, generator, inputs: InpaintInputs) -> MaskedDenoiseState:
    """MoVQ-encode the image with the hole set to 0; the keep-mask on the latent grid; noise; the official sampler."""
    sampler = OfficialSampler()
    timesteps = sampler.set_timesteps(request.steps)
    keep = 1.0 - inputs.user_mask  # the official pipeline's internal mask: 1 = keep
    masked_latents = encode_image(pipe.backend, inputs.pixels * keep)  # the hole set to 0 (mid grey)
    keep_latent = F.interpolate(keep, size=masked_latents.shape[-2:], mode="nearest").to(masked_latents.device)
    extra = torch.cat([keep_latent, masked_latents], dim=1).repeat(request.latent_shape[0], 1, 1, 1)
    latents = prepare_latents(request.latent_shape, generator, device=pipe.backend.device)
    return MaskedDenoiseState(sampler, timesteps, latents, cond, request.guidance, generator, extra=extra)


def _finish_inpaint(inputs: InpaintInputs, images: np.ndarray) -> np.ndarray:
    """k3trt's addition (preserve_unmasked): the input's own pixels outside the repaint region."""
    if not inputs.preserve_unmasked:
        return images
    keep = (1.0 - inputs.user_mask).permute(0, 2, 3, 1).cpu().numpy() > 0.5
    original = ((inputs.pixels + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()
    return np.where(keep, original, images)


def _check_inpaint_shapes(pipe, request, pixels: torch.Tensor) -> None:
    b, c, h, w = request.latent_shape
    rows = b * (2 if request.guided else 1)
    check_shapes(pipe.backend.record("unet_inpainting"), {
        "sample": (rows, 9, h, w), "timestep": (rows,),
        "encoder_hidden_states": (rows, 1, pipe.manifest.data["pipeline"]["context_dim"]),
        "encoder_attention_mask": (rows, 1)})
    check_shapes(pipe.backend.record("movq_decoder"), {"latents": (b, c, h, w)})
    _check_encoder(pipe, pixels)


# ----------------------------------------------------------------------------------------- per task
# One start and one finish per task, used by the functions above and by the batching engine alike, so a request
# served by the engine computes what the library call computes (tests/runtime/test_rt_batching.py).
TaskInputs = Union[Img2ImgInputs, InpaintInputs]
ENGINE_TASKS = ("img2img", "inpaint")  # Flash (no guidance, its own U-Net and sampler) runs through Pipeline.flash


def task_request(inputs: TaskInputs, prompt: str, negative_prompt: str | None = None, **kwargs):
    """The Request of a task: its size is the input's (the canvas when outpainting)."""
    h, w = inputs.pixels.shape[-2:]
    return make_request(single_prompt(prompt), negative_prompt, height=int(h), width=int(w), **kwargs)


def check_task(pipe, request, inputs: TaskInputs) -> None:
    """Everything that can be refused before a model runs: the task's components, steps, strength, shapes."""
    kind = getattr(inputs, "kind", None)
    if kind not in ENGINE_TASKS:
        raise InvalidArgumentError(f"task inputs of type {type(inputs).__name__}", accepted=
                                   "Img2ImgInputs or InpaintInputs (the batching engine does not run Flash: "
                                   "no guidance, its own U-Net and sampler)",
                                   fix="tasks.img2img_inputs / tasks.inpaint_inputs; Flash: Pipeline.flash")
    if tuple(inputs.pixels.shape[-2:]) != (request.height, request.width):
        raise InvalidArgumentError(f"a {request.width}x{request.height} request for a "
                                   f"{inputs.pixels.shape[-1]}x{inputs.pixels.shape[-2]} image",
                                   accepted="the image's size", fix="build the request with tasks.task_request")
    if kind == "img2img":
        check_strength(inputs.strength, request.steps)
        require_components(pipe, "img2img")
        pipe.check_request(request)
        _check_encoder(pipe, inputs.pixels)
    else:
        official_timesteps(request.steps)
        require_components(pipe, "inpaint")
        _check_inpaint_shapes(pipe, request, inputs.pixels)


def start_state(pipe, request, cond, generator: torch.Generator, inputs: TaskInputs) -> DenoiseState:
    """The task's denoising state (runs the MoVQ encoder on the input image); `check_task` passed before."""
    start = _start_img2img if inputs.kind == "img2img" else _start_inpaint
    return start(pipe, request, cond, generator, inputs)


def finish_images(inputs: TaskInputs, images: np.ndarray) -> np.ndarray:
    """The task's last step after the MoVQ decoder (inpainting: paste-back of the unmasked pixels)."""
    return _finish_inpaint(inputs, images) if inputs.kind == "inpaint" else images


# ----------------------------------------------------------------------------------------- Flash
def flash(pipe, prompt: str | Sequence[str], *, seed: int = 0, height: int = 1024, width: int = 1024,
          num_images: int = 1, callback: StepCallback | None = None, recorder: list | None = None,
          decode: bool = True) -> np.ndarray:
    """Kandinsky 3.1 Flash: 4 steps of the distilled U-Net, no guidance (docs/tasks.md); `decode=False`: the
    final x0 latents."""
    sampler = FlashSampler()
    require_components(pipe, "flash")
    request = make_request(prompt, None, seed=seed, steps=len(sampler.timesteps), guidance=0.0, height=height,
                           width=width, num_images=num_images)
    b, c, h, w = request.latent_shape
    check_shapes(pipe.backend.record("unet_flash"), {
        "sample": (b, c, h, w), "timestep": (b,),
        "encoder_hidden_states": (b, 1, pipe.manifest.data["pipeline"]["context_dim"]),
        "encoder_attention_mask": (b, 1)})
    check_shapes(pipe.backend.record("movq_decoder"), {"latents": (b, c, h, w)})
    generator = torch.Generator("cpu").manual_seed(request.seed)
    cond = pipe.encode(request)
    x0 = prepare_latents(request.latent_shape, generator, device=pipe.backend.device)
    for i, t in enumerate(sampler.timesteps):
        x_t = sampler.noisy(x0, t, generator)
        feeds = {"sample": x_t, "timestep": torch.full((b,), float(t), device=x_t.device),
                 "encoder_hidden_states": cond.context, "encoder_attention_mask": cond.mask}
        noise = check_finite(pipe.backend.run("unet_flash", feeds)["noise_pred"], f"unet_flash at t={t}")
        if recorder is not None:
            recorder.append({"step": i, "timestep": t, "sample": x_t.cpu(), "noise_pred": noise.cpu()})
        x0 = sampler.x0(noise, t, x_t)
        if callback is not None:
            verdict = callback(StepInfo(i, len(sampler.timesteps), t, x0))
            if isinstance(verdict, torch.Tensor):
                x0 = verdict.to(x0.device, x0.dtype)
            elif verdict:
                raise GenerationCancelled(f"cancelled by the callback after step {i + 1}/{len(sampler.timesteps)}")
    return _decoded(pipe, x0, decode)
