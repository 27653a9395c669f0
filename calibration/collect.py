"""Trajectory capture: every component input the fp32 runtime produces for a prompt, cached on disk.

The fp32 pipeline runs on ONNX Runtime with its backend's `run` wrapped, so the U-Net inputs are exactly what
the runtime feeds at every denoising step (both guidance halves: the runtime batches [uncond, cond]). One
`.npz` per prompt, named by a key over everything that shapes it (prompt, seed, steps, guidance, size, the
fp32 export keys, tokenizer and scheduler), so re-runs reuse it and a re-export invalidates it.

Only held-out prompts are decoded to images (their PSNR needs them); calibration prompts stop at the final
latents, because the MoVQ decode is the largest memory user of a 1024 x 1024 generation (see `fp32_pipeline`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime.artifacts import Manifest, atomic_write, sha256_json
from ..runtime.cards import COMPONENTS
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
    decoded: bool = True  # False: final latents only, no image (calibration prompts)

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
        if not self.decoded:
            raise ArtifactError(f"trajectory set {self.name!r} was recorded without images (decode=False)")
        return np.concatenate([f.load()["image"] for f in self.files])

    @property
    def decoded(self) -> bool:
        return all(f.decoded for f in self.files)


def unet_calls(arrays: dict, prompt_index: int) -> Iterator[UnetCall]:
    """Expand one prompt's arrays into its per-step U-Net feeds (the context is stored once per prompt)."""
    for step in range(arrays["unet__sample"].shape[0]):
        timestep = arrays["unet__timestep"][step]
        feeds = {"sample": arrays["unet__sample"][step], "timestep": timestep,
                 "encoder_hidden_states": arrays["unet__encoder_hidden_states"],
                 "encoder_attention_mask": arrays["unet__encoder_attention_mask"]}
        yield UnetCall(prompt_index, step, int(timestep[0]), feeds, arrays["unet__noise_pred"][step])


def trajectory_key(manifest: Manifest, prompt: str, seed: int, config: TrajectoryConfig, decoded: bool = True) -> str:
    # the text-to-image trajectory: the task components (MoVQ encoder, U-Net variants) do not take part
    exports = {c: manifest.onnx(c).export_key for c in ("text_encoder", "unet", "movq_decoder")}
    return sha256_json({"prompt": prompt, "seed": seed, "config": config.as_dict(), "exports": exports,
                        "tokenizer": manifest.data["tokenizer"]["sha256"],
                        "scheduler": manifest.data["scheduler"]["sha256"], "version": CALIBRATION_VERSION,
                        **({} if decoded else {"decoded": False})})  # decoded keys unchanged: caches stay valid


def plan(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig, *, decode: bool = True) -> TrajectorySet:
    files = []
    for i, prompt in enumerate(prompts.prompts):
        key = trajectory_key(manifest, prompt, config.seed + i, config, decode)
        files.append(TrajectoryFile(prompt, config.seed + i, key,
                                    manifest.root / CACHE_DIR / f"trajectory-{key[:20]}.npz", decode))
    return TrajectorySet(prompts.name, tuple(files), config)


def collect(manifest: Manifest, prompts: PromptSet, config: TrajectoryConfig, *, threads: int | None = None,
            decode: bool = True, log=print) -> TrajectorySet:
    """Trajectories for `prompts`, from the cache where present; missing ones are run and saved.
    `decode=False` records the U-Net calls and final latents only (no MoVQ decode, no image)."""
    from tqdm import tqdm

    trajectories = plan(manifest, prompts, config, decode=decode)
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
            save_npz(item.path, record_prompt(pipe, item.prompt, item.seed, config, decode=decode), meta={
                "prompt": item.prompt, "seed": item.seed, "config": config.as_dict(), "key": item.key})
    finally:
        pipe.close()
    return trajectories


def fp32_pipeline(manifest: Manifest, threads: int | None):
    """Without ONNX Runtime's memory arena: at 1024 x 1024 each session's arena would otherwise keep its peak
    (U-Net and MoVQ decoder together) for the whole collection."""
    from ..runtime.backends.base import make_backend
    from ..runtime.pipeline import Pipeline

    return Pipeline(manifest, make_backend("ort", manifest, "fp32", threads=threads, arena=False))


def record_prompt(pipe, prompt: str, seed: int, config: TrajectoryConfig, *, decode: bool = True
                  ) -> dict[str, np.ndarray]:
    """Run one prompt with the backend's `run` wrapped; returns the packed per-component inputs."""
    calls: list[tuple[str, dict, dict]] = []
    original = pipe.backend.run

    def recording_run(component, feeds):
        out = original(component, feeds)
        calls.append((component, _numpy(feeds), _numpy(out)))
        return out

    pipe.backend.run = recording_run  # instance attribute shadows the method; removed in `finally`
    try:
        result = pipe.generate(prompt, seed=seed, steps=config.steps, guidance=config.guidance,
                               height=config.height, width=config.width, output_type="np" if decode else "latent")
    finally:
        del pipe.backend.run
    return pack(calls, result if decode else None, None if decode else result)


def _numpy(tensors: dict) -> dict:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in tensors.items()}


def pack(calls: list[tuple[str, dict, dict]], image: np.ndarray | None,
         final_latents: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One prompt's arrays; with `image=None` the run stopped at `final_latents` (no MoVQ call expected)."""
    by_component = {c: [(f, o) for name, f, o in calls if name == c] for c in COMPONENTS}
    decoder_calls = 0 if image is None else 1
    if len(by_component["text_encoder"]) != 1 or len(by_component["movq_decoder"]) != decoder_calls:
        raise ArtifactError(f"expected one text-encoder and {decoder_calls} MoVQ call(s) per prompt, got "
                            f"{len(by_component['text_encoder'])} and {len(by_component['movq_decoder'])}")
    unet = by_component["unet"]
    context, mask = unet[0][0]["encoder_hidden_states"], unet[0][0]["encoder_attention_mask"]
    for feeds, _ in unet:  # stored once per prompt: prove it is constant over the trajectory
        if not (np.array_equal(feeds["encoder_hidden_states"], context)
                and np.array_equal(feeds["encoder_attention_mask"], mask)):
            raise ArtifactError("the U-Net context changed between steps; calibration cannot store it once")
    (te_feeds, _), = by_component["text_encoder"]
    latents = by_component["movq_decoder"][0][0]["latents"] if image is not None else final_latents
    arrays = {
        "text_encoder__input_ids": te_feeds["input_ids"], "text_encoder__attention_mask": te_feeds["attention_mask"],
        "unet__sample": np.stack([f["sample"] for f, _ in unet]),
        "unet__timestep": np.stack([f["timestep"] for f, _ in unet]),
        "unet__encoder_hidden_states": context, "unet__encoder_attention_mask": mask,
        "unet__noise_pred": np.stack([o["noise_pred"] for _, o in unet]),
        "movq_decoder__latents": latents,
    }
    if image is not None:
        arrays["image"] = image.astype(np.float32)
    return arrays


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomic (temporary file, then rename): a killed run never leaves half a file."""
    atomic_write(path, lambda handle: np.savez(handle, meta=np.array(json.dumps(meta, ensure_ascii=False)),
                                               **arrays))
