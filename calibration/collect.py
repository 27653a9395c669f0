"""Trajectory capture: every component input the fp32 runtime produces for a prompt, cached on disk.

The fp32 pipeline runs on ONNX Runtime with its backend's `run` wrapped, so the U-Net inputs are exactly what
the runtime feeds at every denoising step (both guidance halves: the runtime batches [uncond, cond]). One
`.npz` per prompt, named by a key over everything that shapes it (prompt, seed, steps, guidance, size, the
fp32 export keys, tokenizer and scheduler), so re-runs reuse it and a re-export invalidates it.

Which U-Net and which task (`targets.Target`): text to image for the base U-Net; for the inpainting U-Net the
inpainting task, on the image the fp32 text-to-image pipeline made for the same prompt and seed (so a prompt
describes its picture; those trajectories are the base U-Net's, reused from the cache) and a mask drawn from
the seed (`masks.py`: box, strokes, outpaint bands); Flash for the Flash U-Net.

Only held-out prompts are decoded to images (their PSNR needs them); calibration prompts stop at the final
latents, because the MoVQ decode is the largest memory user of a 1024 x 1024 generation (see `fp32_pipeline`).
(An inpainting trajectory of a calibration prompt decodes its source's final latents once, for the picture.)
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from k3trt.calibration.config import CALIBRATION_VERSION, TrajectoryConfig
from k3trt.calibration.masks import MASK_VERSION, calibration_mask, layout_of
from k3trt.calibration.prompts import PromptSet
from k3trt.calibration.targets import TEXT_TO_IMAGE, Target
from k3trt.contract.cards import COMPONENTS
from k3trt.contract.errors import ArtifactError
from k3trt.contract.manifest import Manifest, sha256_json
from k3trt.writing.atomic import atomic_write

CACHE_DIR = Path("calibration") / "cache"  # relative to the artifact directory
TASK_INPUTS = ("input_image", "user_mask")  # what an inpainting trajectory starts from, stored with it


@dataclasses.dataclass(frozen=True)
class UnetCall:
    prompt_index: int
    step: int
    timestep: int
    feeds: dict  # the U-Net's inputs (its card's names) as float32 numpy arrays
    noise_pred: np.ndarray  # what the fp32 U-Net returned for them
    output: str = "noise_pred"  # the name of that output (its card's)


@dataclasses.dataclass(frozen=True)
class TrajectoryFile:
    prompt: str
    seed: int
    key: str
    path: Path
    source: "TrajectoryFile | None" = None  # inpainting: the text-to-image trajectory whose image it repaints
    decoded: bool = True  # False: final latents only, no image (calibration prompts)

    def load(self) -> dict[str, np.ndarray]:
        with np.load(self.path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def task_inputs(self) -> dict[str, np.ndarray]:
        """What the task started from (inpainting: the source image and the user mask); empty otherwise."""
        arrays = self.load()
        return {name: arrays[name] for name in TASK_INPUTS if name in arrays}


@dataclasses.dataclass(frozen=True)
class TrajectorySet:
    name: str
    files: tuple[TrajectoryFile, ...]
    config: TrajectoryConfig
    target: Target = TEXT_TO_IMAGE

    def key(self) -> str:
        return sha256_json([f.key for f in self.files])

    @property
    def guided(self) -> bool:
        return self.target.guided(self.config)

    @property
    def calls(self) -> int:
        return len(self.files) * self.target.calls_per_prompt(self.config)

    def unet_calls(self, prompts: range | None = None) -> Iterator[UnetCall]:
        for index in prompts if prompts is not None else range(len(self.files)):
            yield from unet_calls(self.files[index].load(), index, self.target)

    def images(self) -> np.ndarray:
        if not self.decoded:
            raise ArtifactError(f"trajectory set {self.name!r} was recorded without images (decode=False)")
        return np.concatenate([f.load()["image"] for f in self.files])

    @property
    def decoded(self) -> bool:
        return all(f.decoded for f in self.files)


def unet_calls(arrays: dict, prompt_index: int, target: Target = TEXT_TO_IMAGE) -> Iterator[UnetCall]:
    """Expand one prompt's arrays into its per-step U-Net feeds (the context is stored once per prompt)."""
    name, step_inputs = target.component, ("sample", "timestep")
    for step in range(arrays[f"{name}__sample"].shape[0]):
        feeds = {i: arrays[f"{name}__{i}"][step] if i in step_inputs else arrays[f"{name}__{i}"]
                 for i in target.card.input_names}
        yield UnetCall(prompt_index, step, int(feeds["timestep"][0]), feeds, arrays[f"{name}__{target.output}"][step],
                       target.output)


def trajectory_key(manifest: Manifest, prompt: str, seed: int, config: TrajectoryConfig, decoded: bool = True,
                   target: Target = TEXT_TO_IMAGE, source: TrajectoryFile | None = None,
                   producer: str = "ort") -> str:
    exports = {c: manifest.onnx(c).export_key for c in target.exports()}
    spec = {"prompt": prompt, "seed": seed, "config": config.as_dict(), "exports": exports,
            "tokenizer": manifest.data["tokenizer"]["sha256"],
            "scheduler": manifest.data["scheduler"]["sha256"], "version": CALIBRATION_VERSION,
            **({} if decoded else {"decoded": False}),  # decoded keys unchanged: caches stay valid
            **({} if producer == "ort" else {"producer": producer})}  # the same for ONNX Runtime's
    if target != TEXT_TO_IMAGE:  # (text to image keeps the key it always had: its caches stay valid)
        spec.update(target=target.component, task=target.task, masks=MASK_VERSION,
                    source=source.key if source is not None else None)
    return sha256_json(spec)


def plan(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig, target: Target = TEXT_TO_IMAGE,
         sources: TrajectorySet | None = None, *, decode: bool = True, producer: str = "ort") -> TrajectorySet:
    files = []
    for i, prompt in enumerate(prompts.prompts):
        source = sources.files[i] if sources is not None else None
        key = trajectory_key(manifest, prompt, config.seed + i, config, decode, target, source, producer)
        files.append(TrajectoryFile(prompt, config.seed + i, key,
                                    manifest.root / CACHE_DIR / f"trajectory-{key[:20]}.npz", source, decode))
    return TrajectorySet(prompts.name, tuple(files), config, target)


def planned(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig, target: Target = TEXT_TO_IMAGE, *,
            decode: bool = True, producer: str = "ort") -> TrajectorySet:
    """The trajectory set `collect` returns for these arguments, without running anything (the files may or may
    not exist yet)."""
    sources = planned(manifest, prompts, config, decode=decode, producer=producer) if target.masked else None
    return plan(manifest, prompts, config, target, sources, decode=decode, producer=producer)


def collect(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig, *, target: Target = TEXT_TO_IMAGE,
            threads: int | None = None, decode: bool = True, producer: Producer | None = None,
            range_pass=None, log=print) -> TrajectorySet:
    """Trajectories for `prompts`, from the cache where present; missing ones are run and saved. Inpainting
    trajectories first collect (or reuse) the text-to-image ones whose images they repaint.
    `decode=False` records the U-Net calls and final latents only (no MoVQ decode, no image).
    `producer`: what runs the fp32 components (default: ONNX Runtime on the CPU).
    `range_pass` (torch producer): a `torch_collector.RangePass` that runs the target U-Net's calls of the
    prompts run here, folding their activation ranges on the way (not the source trajectories' calls)."""
    from tqdm import tqdm

    producer = producer or Producer()
    sources = collect(manifest, prompts, config, threads=threads, decode=decode, producer=producer, log=log) \
        if target.masked else None
    trajectories = plan(manifest, prompts, config, target, sources, decode=decode, producer=producer.name)
    missing = [f for f in trajectories.files if not f.path.is_file()]
    cached = len(trajectories.files) - len(missing)
    where, what = manifest.root / CACHE_DIR, f"[{target.task}: {target.component}]"
    if not missing:
        log(f"{prompts.name}: reusing cached trajectories for all {cached} prompts ({config.steps} steps, "
            f"{config.width}x{config.height}) from {where} {what}")
        return trajectories
    log(f"{prompts.name}: {cached} prompt(s) cached, running the fp32 pipeline ({producer.label}) for "
        f"{len(missing)} ({config.steps} steps, {config.width}x{config.height}) -> {where} {what}")
    pipe = fp32_pipeline(manifest, threads, producer, range_pass)
    try:
        for item in tqdm(missing, desc=f"{prompts.name} trajectories", unit="prompt", file=sys.stderr):
            inputs = task_inputs(pipe, item, config) if target.masked else {}
            arrays = record_prompt(pipe, item.prompt, item.seed, config, target, inputs, decode=decode)
            save_npz(item.path, arrays, meta={
                "prompt": item.prompt, "seed": item.seed, "config": config.as_dict(), "key": item.key,
                "component": target.component, "task": target.task,
                **({"mask_layout": layout_of(item.seed)} if inputs else {})})
    finally:
        pipe.close()
    return trajectories


def task_inputs(pipe, item: TrajectoryFile, config: TrajectoryConfig) -> dict[str, np.ndarray]:
    """The inpainting start: the source trajectory's image at 8 bits (what a PNG holds) and the seed's mask. A
    source recorded without its image (a calibration prompt) is decoded from its final latents here."""
    import torch

    source = item.source.load()
    image = source["image"][0] if "image" in source else \
        pipe.decode(torch.from_numpy(source["movq_decoder__latents"]))[0]
    return {"input_image": (np.round(np.clip(image, 0, 1) * 255) / 255).astype(np.float32),
            "user_mask": calibration_mask(item.seed, config.height, config.width)}


@dataclasses.dataclass(frozen=True)
class Producer:
    """What runs the fp32 trajectories: ONNX Runtime on the CPU (`ort`), or the torch modules the ONNX was
    exported from (`torch`, on `device`, from `model_dir` or the manifest's source folder)."""
    name: str = "ort"
    device: str = "cpu"
    model_dir: str | None = None

    @property
    def label(self) -> str:
        return "ONNX Runtime, cpu" if self.name == "ort" else f"torch, {self.device}"


def fp32_pipeline(manifest: Manifest, threads: int | None, producer: Producer = Producer(), range_pass=None):
    """ONNX Runtime without its memory arena: at 1024 x 1024 each session's arena would otherwise keep its peak
    (U-Net and MoVQ decoder together) for the whole collection."""
    from k3trt.runtime.backends.registry import make_backend
    from k3trt.runtime.pipeline import Pipeline

    if producer.name == "torch":
        from k3trt.calibration.torch_collector import TorchModulesBackend

        return Pipeline(manifest, TorchModulesBackend(manifest, producer.model_dir, device=producer.device,
                                                        threads=threads, range_pass=range_pass))
    if range_pass is not None:
        raise ValueError("a range pass runs in the torch producer only")
    return Pipeline(manifest, make_backend("ort", manifest, "fp32", threads=threads, arena=False))


def record_prompt(pipe, prompt: str, seed: int, config: TrajectoryConfig, target: Target = TEXT_TO_IMAGE,
                  inputs: dict | None = None, *, decode: bool = True) -> dict[str, np.ndarray]:
    """Run one prompt's task with the backend's `run` wrapped; returns the packed per-component inputs."""
    calls: list[tuple[str, dict, dict]] = []
    original = pipe.backend.run

    def recording_run(component, feeds):
        out = original(component, feeds)
        calls.append((component, _numpy(feeds), _numpy(out)))
        return out

    pipe.backend.run = recording_run  # instance attribute shadows the method; removed in `finally`
    try:
        result = target.run(pipe, prompt, seed, config, inputs or {}, decode=decode)
    finally:
        del pipe.backend.run
    arrays = pack(calls, result if decode else None, target, None if decode else result)
    return {**arrays, **(inputs or {})}


def _numpy(tensors: dict) -> dict:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in tensors.items()}


def pack(calls: list[tuple[str, dict, dict]], image: np.ndarray | None, target: Target = TEXT_TO_IMAGE,
         final_latents: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One prompt's calls as arrays: the U-Net's per-step inputs and outputs (`<component>__<name>`), its
    context once, and the single calls of the other components. With `image=None` the run stopped at
    `final_latents` (no MoVQ decoder call expected; they are stored as its input)."""
    by_component = {c: [(f, o) for name, f, o in calls if name == c] for c in COMPONENTS}
    singles = [c for c in target.exports() if c != target.component]
    expected = {c: 0 if c == "movq_decoder" and image is None else 1 for c in singles}
    if any(len(by_component[c]) != n for c, n in expected.items()):
        raise ArtifactError("expected per prompt " + ", ".join(f"{n} {c} call(s)" for c, n in expected.items())
                            + ", got " + ", ".join(f"{len(by_component[c])}" for c in singles))
    unet, name = by_component[target.component], target.component
    context, mask = unet[0][0]["encoder_hidden_states"], unet[0][0]["encoder_attention_mask"]
    for feeds, _ in unet:  # stored once per prompt: prove it is constant over the trajectory
        if not (np.array_equal(feeds["encoder_hidden_states"], context)
                and np.array_equal(feeds["encoder_attention_mask"], mask)):
            raise ArtifactError("the U-Net context changed between steps; calibration cannot store it once")
    arrays = {f"{c}__{i}": v for c in singles if expected[c] for i, v in by_component[c][0][0].items()}
    arrays.update({f"{name}__sample": np.stack([f["sample"] for f, _ in unet]),
                   f"{name}__timestep": np.stack([f["timestep"] for f, _ in unet]),
                   f"{name}__encoder_hidden_states": context, f"{name}__encoder_attention_mask": mask,
                   f"{name}__{target.output}": np.stack([o[target.output] for _, o in unet])})
    if image is None:
        arrays["movq_decoder__latents"] = final_latents
    else:
        arrays["image"] = image.astype(np.float32)
    return arrays


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomic (temporary file, then rename): a killed run never leaves half a file."""
    atomic_write(path, lambda handle: np.savez(handle, meta=np.array(json.dumps(meta, ensure_ascii=False)),
                                               **arrays))
