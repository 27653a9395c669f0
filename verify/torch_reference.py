"""The PyTorch reference: diffusers.Kandinsky3Pipeline, instrumented, and a torch backend for the runtime.

This module imports diffusers/transformers model code; the runtime loads it only when `backend="torch"`, or
for `k3trt parity` / `k3trt bench`, never on its own path.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from k3trt.contract.errors import ModelSourceError
from k3trt.export.components import SPECS
from k3trt.export.sources import open_model_dir, open_source_dir
from k3trt.runtime.backends.base import Backend
from k3trt.runtime.backends.registry import register_backend
from k3trt.runtime.seeding import make_generator


def load_reference(model_dir: str | Path, variant: str | None = None):
    """diffusers.Kandinsky3Pipeline in fp32 on the CPU from a diffusers-layout folder (safetensors only)."""
    from diffusers import Kandinsky3Pipeline

    source = open_model_dir(model_dir, variant=variant)
    pipe = Kandinsky3Pipeline.from_pretrained(str(source.root), torch_dtype=torch.float32, use_safetensors=True,
                                              variant=source.variant)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclasses.dataclass
class ReferenceRun:
    """What the reference computed, recorded through hooks, plus per-stage wall times (seconds)."""
    images: np.ndarray  # (N, H, W, 3) in [0, 1]
    text_calls: list = dataclasses.field(default_factory=list)  # {"input_ids", "attention_mask", "hidden"}
    unet_calls: list = dataclasses.field(default_factory=list)  # {"sample", "timestep", "context", "mask", "out"}
    movq_calls: list = dataclasses.field(default_factory=list)  # {"latents", "image"}
    timings: dict = dataclasses.field(default_factory=lambda: {"text_encoder": [], "unet": [], "movq_decoder": []})
    total_s: float = 0.0


def _timed_hooks(module: torch.nn.Module, bucket: list):
    state = {}
    pre = module.register_forward_pre_hook(lambda *_: state.__setitem__("t", time.perf_counter()))
    post = module.register_forward_hook(lambda *_: bucket.append(time.perf_counter() - state["t"]))
    return [pre, post]


def _record_hooks(pipe, run: ReferenceRun):
    def text_hook(_, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        run.text_calls.append({"input_ids": ids.clone(), "attention_mask": kwargs["attention_mask"].clone(),
                               "hidden": output[0].detach().clone()})

    def unet_hook(_, args, kwargs, output):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        run.unet_calls.append({"sample": args[0].clone(), "timestep": int(t),
                               "context": kwargs["encoder_hidden_states"].clone(),
                               "mask": kwargs["encoder_attention_mask"].clone(), "out": output[0].clone()})

    return [pipe.text_encoder.register_forward_hook(text_hook, with_kwargs=True),
            pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)]


def _wrap_decode(pipe, run: ReferenceRun, record: bool):
    original = pipe.movq.decode

    def decode(latents, *args, **kwargs):
        start = time.perf_counter()
        out = original(latents, *args, **kwargs)
        run.timings["movq_decoder"].append(time.perf_counter() - start)
        if record:
            run.movq_calls.append({"latents": latents.clone(), "image": out.sample.clone()})
        return out

    pipe.movq.decode = decode
    return original


def run_reference(pipe, request, *, record: bool = True) -> ReferenceRun:
    """Run diffusers on a runtime `Request` (same seed semantics) and record every component call."""
    run = ReferenceRun(images=np.empty(0))
    handles = _timed_hooks(pipe.text_encoder, run.timings["text_encoder"])
    handles += _timed_hooks(pipe.unet, run.timings["unet"])
    if record:
        handles += _record_hooks(pipe, run)
    original = _wrap_decode(pipe, run, record)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe(list(request.prompts),
                       negative_prompt=list(request.negative_prompts) if request.negative_prompts else None,
                       num_inference_steps=request.steps, guidance_scale=request.guidance,
                       height=request.height, width=request.width, num_images_per_prompt=request.num_images,
                       generator=make_generator(request.seed), output_type="np")
        run.total_s = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
        pipe.movq.decode = original
    run.images = np.asarray(out.images)
    return run


class TorchBackend(Backend):
    """The torch modules behind the runtime's interface: the runtime loop with the reference's kernels."""

    name = "torch"

    def __init__(self, manifest, precision="fp32", *, model_dir: str | Path | None = None):
        super().__init__(manifest, precision)
        root = model_dir or manifest.data.get("source", {}).get("path")
        if not root or not Path(root).is_dir():
            raise ModelSourceError(f"the torch backend needs the model folder; {root!r} is not one",
                                   fix="pass model_dir=... (CLI: --model DIR)")
        self.source = open_source_dir(root, variant=manifest.data.get("source", {}).get("variant"))
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, component: str) -> torch.nn.Module:
        if component not in self._modules:
            spec = SPECS[component]
            self._modules[component] = spec.wrapper(self.source.load(spec.folder)).eval()
        return self._modules[component]

    def _run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = SPECS[component]
        with torch.no_grad():
            out = self.module(component)(*(feeds[name] for name in spec.input_names))
        return {spec.output_names[0]: out}

    def close(self) -> None:
        self._modules.clear()


def register_torch_backend() -> None:
    """Make `make_backend("torch", ...)` (and `--backend torch`) build a TorchBackend. Explicit, so importing a
    package never changes what the runtime can do."""
    register_backend("torch", TorchBackend)
