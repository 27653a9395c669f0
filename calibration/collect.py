"""Trajectory capture: every component input the fp32 runtime produces for a prompt, cached on disk.

The fp32 pipeline runs on ONNX Runtime with its backend's `run` wrapped, so the U-Net inputs are exactly what
the runtime feeds at every denoising step (both guidance halves: the runtime batches [uncond, cond]). One
`.npz` per prompt, named by a key over everything that shapes it (prompt, seed, steps, guidance, size, the
fp32 export keys, tokenizer and scheduler), so re-runs reuse it and a re-export invalidates it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime.artifacts import COMPONENTS, Manifest, atomic_write, sha256_json
from ..runtime.errors import ArtifactError
from .config import CALIBRATION_VERSION, TrajectoryConfig
from .prompts import PromptSet

CACHE_DIR = Path("calibration") / "cache"  # relative to the artifact directory
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "encoder_attention_mask")


@dataclasses.dataclass(frozen=True)
class UnetCall:
    prompt_index: int
    step: int
    timestep: int
    feeds: dict  # the four U-Net inputs as float32 numpy arrays
    noise_pred: np.ndarray  # what the fp32 U-Net returned for them


@dataclasses.dataclass(frozen=True)
class TrajectoryFile:
    prompt: str
    seed: int
    key: str
    path: Path

    def load(self) -> dict[str, np.ndarray]:
        with np.load(self.path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


@dataclasses.dataclass(frozen=True)
class TrajectorySet:
    name: str
    files: tuple[TrajectoryFile, ...]
    config: TrajectoryConfig

    def key(self) -> str:
        return sha256_json([f.key for f in self.files])

    def unet_calls(self, prompts: range | None = None) -> Iterator[UnetCall]:
        for index in prompts if prompts is not None else range(len(self.files)):
            yield from unet_calls(self.files[index].load(), index)

    def images(self) -> np.ndarray:
        return np.concatenate([f.load()["image"] for f in self.files])


def unet_calls(arrays: dict, prompt_index: int) -> Iterator[UnetCall]:
    """Expand one prompt's arrays into its per-step U-Net feeds (the context is stored once per prompt)."""
    for step in range(arrays["unet__sample"].shape[0]):
        timestep = arrays["unet__timestep"][step]
        feeds = {"sample": arrays["unet__sample"][step], "timestep": timestep,
                 "encoder_hidden_states": arrays["unet__encoder_hidden_states"],
                 "encoder_attention_mask": arrays["unet__encoder_attention_mask"]}
        yield UnetCall(prompt_index, step, int(timestep[0]), feeds, arrays["unet__noise_pred"][step])


def trajectory_key(manifest: Manifest, prompt: str, seed: int, config: TrajectoryConfig) -> str:
    # the text-to-image trajectory: the task components (MoVQ encoder, U-Net variants) do not take part
    exports = {c: manifest.onnx(c).export_key for c in ("text_encoder", "unet", "movq_decoder")}
    return sha256_json({"prompt": prompt, "seed": seed, "config": config.as_dict(), "exports": exports,
                        "tokenizer": manifest.data["tokenizer"]["sha256"],
                        "scheduler": manifest.data["scheduler"]["sha256"], "version": CALIBRATION_VERSION})


def plan(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig) -> TrajectorySet:
    files = []
    for i, prompt in enumerate(prompts.prompts):
        key = trajectory_key(manifest, prompt, config.seed + i, config)
        files.append(TrajectoryFile(prompt, config.seed + i, key,
                                    manifest.root / CACHE_DIR / f"trajectory-{key[:20]}.npz"))
    return TrajectorySet(prompts.name, tuple(files), config)


def collect(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig, *, threads: int | None = None,
            log=print) -> TrajectorySet:
    """Trajectories for `prompts`, from the cache where present; missing ones are run and saved."""
    from tqdm import tqdm

    trajectories = plan(manifest, prompts, config)
    missing = [f for f in trajectories.files if not f.path.is_file()]
    cached = len(trajectories.files) - len(missing)
    where = manifest.root / CACHE_DIR
    if not missing:
        log(f"{prompts.name}: reusing cached trajectories for all {cached} prompts ({config.steps} steps, "
            f"{config.width}x{config.height}) from {where}")
        return trajectories
    log(f"{prompts.name}: {cached} prompt(s) cached, running the fp32 pipeline for {len(missing)} "
        f"({config.steps} steps, {config.width}x{config.height}) -> {where}")
    pipe = fp32_pipeline(manifest, threads)
    try:
        for item in tqdm(missing, desc=f"{prompts.name} trajectories", unit="prompt", file=sys.stderr):
            save_npz(item.path, record_prompt(pipe, item.prompt, item.seed, config), meta={
                "prompt": item.prompt, "seed": item.seed, "config": config.as_dict(), "key": item.key})
    finally:
        pipe.close()
    return trajectories


def fp32_pipeline(manifest: Manifest, threads: int | None):
    from ..runtime.backends.base import make_backend
    from ..runtime.pipeline import Pipeline

    return Pipeline(manifest, make_backend("ort", manifest, "fp32", threads=threads))


def record_prompt(pipe, prompt: str, seed: int, config: TrajectoryConfig) -> dict[str, np.ndarray]:
    """Run one prompt with the backend's `run` wrapped; returns the packed per-component inputs."""
    calls: list[tuple[str, dict, dict]] = []
    original = pipe.backend.run

    def recording_run(component, feeds):
        out = original(component, feeds)
        calls.append((component, _numpy(feeds), _numpy(out)))
        return out

    pipe.backend.run = recording_run  # instance attribute shadows the method; removed in `finally`
    try:
        image = pipe.generate(prompt, seed=seed, steps=config.steps, guidance=config.guidance,
                              height=config.height, width=config.width, output_type="np")
    finally:
        del pipe.backend.run
    return pack(calls, image)


def _numpy(tensors: dict) -> dict:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in tensors.items()}


def pack(calls: list[tuple[str, dict, dict]], image: np.ndarray) -> dict[str, np.ndarray]:
    by_component = {c: [(f, o) for name, f, o in calls if name == c] for c in COMPONENTS}
    if len(by_component["text_encoder"]) != 1 or len(by_component["movq_decoder"]) != 1:
        raise ArtifactError("expected one text-encoder and one MoVQ call per prompt, got "
                            f"{len(by_component['text_encoder'])} and {len(by_component['movq_decoder'])}")
    unet = by_component["unet"]
    context, mask = unet[0][0]["encoder_hidden_states"], unet[0][0]["encoder_attention_mask"]
    for feeds, _ in unet:  # stored once per prompt: prove it is constant over the trajectory
        if not (np.array_equal(feeds["encoder_hidden_states"], context)
                and np.array_equal(feeds["encoder_attention_mask"], mask)):
            raise ArtifactError("the U-Net context changed between steps; calibration cannot store it once")
    (te_feeds, _), = by_component["text_encoder"]
    (movq_feeds, _), = by_component["movq_decoder"]
    return {
        "text_encoder__input_ids": te_feeds["input_ids"], "text_encoder__attention_mask": te_feeds["attention_mask"],
        "unet__sample": np.stack([f["sample"] for f, _ in unet]),
        "unet__timestep": np.stack([f["timestep"] for f, _ in unet]),
        "unet__encoder_hidden_states": context, "unet__encoder_attention_mask": mask,
        "unet__noise_pred": np.stack([o["noise_pred"] for _, o in unet]),
        "movq_decoder__latents": movq_feeds["latents"], "image": image.astype(np.float32),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomic (temporary file, then rename): a killed run never leaves half a file."""
    atomic_write(path, lambda handle: np.savez(handle, meta=np.array(json.dumps(meta, ensure_ascii=False)),
                                               **arrays))
