"""The lean Kandinsky 3 text-to-image loop around exported components.

Semantics are diffusers.Kandinsky3Pipeline's, step for step: tokenize to 128 -> encode -> cut context ->
[uncond, cond] -> DDPM with (g + 1) * cond - g * uncond -> MoVQ decode -> clamp(x * 0.5 + 0.5). With a seed,
the CPU generator is consumed in the same order and shapes as the reference, so the noise is identical.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from k3trt.contract.arguments import (
    check_choice,
    check_options,
    check_path,
)
from k3trt.contract.cards import guided_batch
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.limits import check_image_request, default_size
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import DEFAULT_MIN_PSNR_DB
from k3trt.runtime.backends.base import Backend, check_shapes
from k3trt.runtime.animation import plan_animation, render_frames
from k3trt.runtime.backends.registry import make_backend
from k3trt.runtime.denoise_loop import (
    Conditioning,
    DenoiseState,
    GenerationCancelled,
    StepCallback,
    StepInfo,
    check_finite,
    decode_latents,
    denoise,
    encode_prompts,
    prepare_latents,
)
from k3trt.runtime.request import Request, make_request
from k3trt.runtime.scheduler import make_scheduler
from k3trt.runtime.seeding import make_generator
from k3trt.runtime.tasks import flash, img2img, inpaint
from k3trt.runtime.tokenizer import PromptTokenizer

__all__ = ["Pipeline", "Request", "make_request", "GenerationCancelled", "StepInfo", "check_finite", "to_pil"]

log = logging.getLogger("k3trt")


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((img * 255).round().astype("uint8")) for img in images]  # as diffusers numpy_to_pil


class Pipeline:
    """Load once, call `generate` many times. `backend` is a name ("ort", "trt", "torch") or a Backend."""

    def __init__(self, manifest: Manifest, backend: Backend, *, scheduler: str = "ddpm"):
        self.manifest, self.backend, self.scheduler_name = manifest, backend, scheduler
        tok = manifest.file_record("tokenizer")
        manifest.verify([tok, manifest.file_record("scheduler")])
        self.tokenizer = PromptTokenizer(manifest.path(tok.path), max_length=manifest.data["tokenizer"]["max_length"],
                                         pad_id=manifest.data["tokenizer"].get("pad_id", 0))
        self.scheduler_config = json.loads(manifest.path(manifest.data["scheduler"]["path"]).read_text())
        make_scheduler(scheduler, self.scheduler_config)  # fail now, not mid-request
        self.loras: tuple = ()  # the LoRA adapters in use (runtime/lora.py LoraChoice), none: base weights

    @classmethod
    def from_artifacts(cls, path: str | Path | Manifest, backend: str | Backend = "auto",
                       precision: str | Mapping[str, str] | None = "fp32", *, scheduler: str = "ddpm",
                       lora=None, min_psnr: float = DEFAULT_MIN_PSNR_DB, **backend_options) -> "Pipeline":
        """A pipeline over an artifact directory (`path`, or its already loaded Manifest: read once); `lora`:
        adapters applied from the start (see `set_lora`).

        `backend="auto"` (the default) runs on the fastest fp32-exact backend installed (OpenVINO where present,
        else ONNX Runtime); `precision="auto"` on the fastest precision whose quality recorded by `k3trt qualify`
        meets `min_psnr` dB (runtime/backends/auto.py). `pipeline.backend.auto_choice` says what was chosen."""
        from k3trt.runtime.lora import load_loras

        loras = load_loras(lora)  # a bad adapter fails before any session opens
        manifest = path if isinstance(path, Manifest) else Manifest.load(check_path("path", path))
        if not isinstance(backend, (str, Backend)):
            raise InvalidArgumentError(f"backend={backend!r}",
                                       accepted="auto, ort, openvino, trt, torch, or a Backend instance",
                                       fix='e.g. backend="auto" (the default)')
        check_choice("scheduler", scheduler, ("ddpm", "ddim"))
        if isinstance(backend, str):
            backend = make_backend(backend, manifest, precision, min_psnr=min_psnr, **backend_options)
        pipe = cls(manifest, backend, scheduler=scheduler)
        if loras:
            pipe.set_lora(loras)
        return pipe

    def set_lora(self, lora=None) -> int:
        """Run with these LoRA adapters (None or []: the base weights, bit for bit). `lora`: "PATH[:SCALE]", a
        Path, (path, scale), or a list of them blended with their own scales; PATH is a PEFT adapter folder or
        a diffusers/kohya .safetensors file. Nothing is re-exported: the changed weights are computed from the
        artifacts' weight map and swapped into the backend (runtime/lora.py). Call between generations. Returns the
        bytes of the replaced weights now held (0 for the base)."""
        from k3trt.runtime.lora import load_loras, weight_overrides

        choices = load_loras(lora)
        graphs = {c: self.backend.weight_graph(c) for c in ("unet", "text_encoder") if self.manifest.has_onnx(c)}
        overrides = weight_overrides(self.manifest, graphs, choices) if choices else {}
        self.backend.set_weights(overrides)
        self.loras = choices
        return sum(array.nbytes for weights in overrides.values() for array in weights.values())

    # ------------------------------------------------------------------------------------- stages
    def encode(self, request: Request) -> Conditioning:
        """Context and 0/1 mask for the U-Net, [uncond..., cond...] when guided (diffusers' encode_prompt)."""
        return encode_prompts(self.backend, self.tokenizer, [request])[0]

    def new_scheduler(self, steps: int):
        """A fresh scheduler (per-request state) and its timesteps for `steps` inference steps."""
        scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)
        return scheduler, scheduler.set_timesteps(steps)

    def start(self, request: Request, cond: Conditioning, generator: torch.Generator | None, *,
              latents: torch.Tensor | None = None, timesteps: Sequence[int] | None = None) -> DenoiseState:
        """A request's denoising state: its own scheduler, noise from `generator` (or `latents`) and timesteps
        (default: all of the schedule; a task may pass a tail of it)."""
        scheduler, schedule = self.new_scheduler(request.steps)
        latents = prepare_latents(request.latent_shape, generator, latents=latents,
                                  init_noise_sigma=scheduler.init_noise_sigma, device=self.backend.device)
        return DenoiseState(scheduler, schedule if timesteps is None else timesteps, latents, cond,
                            request.guidance, generator)

    def denoise(self, state: DenoiseState, callback: StepCallback | None = None,
                recorder: list | None = None) -> torch.Tensor:
        return denoise(self.backend, state, callback, recorder)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return decode_latents(self.backend, latents)

    # ------------------------------------------------------------------------------------- API
    def check_request(self, request: Request) -> None:
        """Fail before any work if the request's shapes fall outside what the backend runs: the artifacts' axes,
        narrowed by the backend (TensorRT: the built engines' optimization profiles, not the ONNX's axes), or a
        component it needs is damaged or foreign (hashes and I/O signatures, `Backend.ready`)."""
        check_image_request(self.manifest, height=request.height, width=request.width,
                            images=request.latent_shape[0], guided=request.guided, axes=self.backend.axes)
        b, c, h, w = request.latent_shape
        unet_batch = guided_batch(b, request.guided)
        check_shapes(self.backend.limits_record("unet"), {
            "sample": (unet_batch, c, h, w), "timestep": (unet_batch,),
            "encoder_hidden_states": (unet_batch, 1, self.manifest.data["pipeline"]["context_dim"]),
            "encoder_attention_mask": (unet_batch, 1)})
        check_shapes(self.backend.limits_record("movq_decoder"), {"latents": (b, c, h, w)})
        self.backend.ready(("text_encoder", "unet", "movq_decoder"))

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 seed: int = 0, steps: int = 25, guidance: float = 3.0, height: int | None = None,
                 width: int | None = None, num_images: int = 1, output_type: str = "pil",
                 callback: StepCallback | None = None, recorder: list | None = None, **unknown):
        """Images for `prompt` (PIL list, or a float array (N, H, W, 3) in [0, 1] with output_type="np"), or the
        final latents (N, 4, H/8, W/8) as a float array with output_type="latent" (the MoVQ decoder is not run).

        `height`/`width` in pixels default to the size the artifacts were made for (`limits.default_size`).
        `callback(StepInfo)` runs after every step; returning True cancels (GenerationCancelled), returning a
        tensor replaces the latents. Safe to call from many threads at once: all per-request state is local."""
        check_options("Pipeline.generate", unknown, ())
        check_choice("output_type", output_type, ("pil", "np", "latent"))
        if callback is not None and not callable(callback):
            raise InvalidArgumentError(f"callback={callback!r} is not callable", accepted="a function or None",
                                       fix="pass a function taking a StepInfo")
        if recorder is not None and not isinstance(recorder, list):
            raise InvalidArgumentError(f"recorder is a {type(recorder).__name__}", accepted="a list or None",
                                       fix="pass a list to collect the U-Net calls, or leave it out")
        size = default_size(self.manifest, self.backend.axes)
        request = make_request(prompt, negative_prompt, seed=seed, steps=steps, guidance=guidance,
                               height=size if height is None else height, width=size if width is None else width,
                               num_images=num_images)
        return self.run(request, output_type=output_type, callback=callback, recorder=recorder)

    def run(self, request: Request, *, output_type: str = "pil", callback: StepCallback | None = None,
            recorder: list | None = None):
        """`generate` for a Request already built (`make_request`): the request is checked against the
        artifacts here, once, and not rebuilt."""
        check_choice("output_type", output_type, ("pil", "np", "latent"))
        if not isinstance(request, Request):
            raise InvalidArgumentError(f"request is a {type(request).__name__}", accepted="a Request (make_request)",
                                       fix="build it with k3trt.runtime.pipeline.make_request(...)")
        self.check_request(request)
        generator = make_generator(request.seed)  # one per request (thread-safe); all 64 bits count
        state = self.start(request, self.encode(request), generator)
        latents = self.denoise(state, callback, recorder)
        if output_type == "latent":
            return latents.detach().cpu().numpy()
        images = self.decode(latents)
        return to_pil(images) if output_type == "pil" else images

    # ------------------------------------------------------------------------------------- tasks
    def img2img(self, prompt: str, image, *, output_type: str = "pil", **kwargs):
        """Image to image, diffusers.Kandinsky3Img2ImgPipeline step for step (`runtime/tasks.py: img2img`)."""
        return _as_output(img2img, output_type, self, prompt, image, **kwargs)

    def inpaint(self, prompt: str, image, mask=None, *, output_type: str = "pil", **kwargs):
        """Inpainting (`mask`: white = repaint) or outpainting (`outpaint="left=128"`), the official pipeline's
        semantics (`runtime/tasks.py: inpaint`, docs/tasks.md)."""
        return _as_output(inpaint, output_type, self, prompt, image, mask, **kwargs)

    def flash(self, prompt: str | Sequence[str], *, output_type: str = "pil", **kwargs):
        """Kandinsky 3.1 Flash: 4 steps of the distilled U-Net, no guidance (`runtime/tasks.py: flash`)."""
        return _as_output(flash, output_type, self, prompt, **kwargs)

    def animate(self, prompt, *, callback: StepCallback | None = None, **options) -> list:
        """The frames of an animation (PIL images in video order, all held): mode "zoom-out"/"zoom-in" (keyframes
        by `inpaint(outpaint=...)`, crops between) or "deforum" (`img2img` of the moved previous frame); `prompt`
        and the numeric options take schedules such as "0: a forest; 24: a city" (`runtime/animation.py`,
        docs/animation.md). `animate_frames` yields them one at a time instead; `k3trt.runtime.video.encode`
        writes MP4/WebP/GIF."""
        frames = sorted(self.animate_frames(prompt, callback=callback, **options), key=lambda f: f.index)
        return [frame.image for frame in frames]

    def animate_frames(self, prompt, *, callback: StepCallback | None = None, **options):
        """`animate`'s frames as they are made (AnimationFrame: index, image, keyframe); every option is checked
        now, before the first model call."""
        return render_frames(self, plan_animation(self, prompt, **options), callback=callback)

    def close(self) -> None:
        self.backend.close()


def _as_output(task, output_type: str, *args, **kwargs):
    """PIL images, a float array (N, H, W, 3), or with "latent" the final latents (the MoVQ decoder not run)."""
    if output_type not in ("pil", "np", "latent"):
        raise InvalidArgumentError(f"output_type={output_type!r}", accepted="pil, np, latent")
    if output_type == "latent":
        return task(*args, decode=False, **kwargs)
    images = task(*args, **kwargs)
    return to_pil(images) if output_type == "pil" else images
