"""Model sources: a diffusers-layout folder (`Kandinsky3Pipeline.save_pretrained`) or a preset.

Only safetensors weights are loaded (`use_safetensors=True`): never a pickle.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..runtime.artifacts import sha256_file, sha256_json
from ..runtime.errors import ModelSourceError

REQUIRED_FOLDERS = ("tokenizer", "text_encoder", "unet", "movq", "scheduler")
EXPECTED_CLASSES = {"text_encoder": "T5EncoderModel", "unet": "Kandinsky3UNet", "movq": "VQModel",
                    "scheduler": "DDPMScheduler"}
WEIGHT_SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    root: Path
    variant: str | None  # None for plain fp32 files, "fp16" for `*.fp16.safetensors`
    label: str  # "preset tiny" or the folder path, for messages and the manifest

    # --- metadata
    def config(self, folder: str) -> dict:
        name = "scheduler_config.json" if folder == "scheduler" else "config.json"
        return json.loads((self.root / folder / name).read_text())

    def weight_files(self, folder: str) -> list[Path]:
        return variant_files(self.root / folder, self.variant)

    def source_hash(self, folder: str) -> str:
        """Config + weights of one folder: what decides whether its export is still current."""
        weights = {f.name: sha256_file(f) for f in self.weight_files(folder)}
        return sha256_json({"config": self.config(folder), "weights": weights, "variant": self.variant})

    # --- loading (fp32, eval mode, one component at a time)
    def load(self, folder: str):
        import torch

        kwargs = dict(torch_dtype=torch.float32, use_safetensors=True, variant=self.variant)
        path = str(self.root / folder)
        try:
            if folder == "text_encoder":
                from transformers import T5EncoderModel

                return T5EncoderModel.from_pretrained(path, **kwargs).eval()
            if folder == "unet":
                from diffusers import Kandinsky3UNet

                return Kandinsky3UNet.from_pretrained(path, **kwargs).eval()
            if folder == "movq":
                from diffusers import VQModel

                return VQModel.from_pretrained(path, **kwargs).eval()
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelSourceError(f"cannot load {folder!r} from {path!r}: {exc}",
                                   fix="check the folder holds config.json and *.safetensors weights") from exc
        raise ModelSourceError(f"unknown model folder {folder!r}", accepted=", ".join(REQUIRED_FOLDERS))


def variant_files(folder: Path, variant: str | None) -> list[Path]:
    """Weight files of one variant, shards included: `model.safetensors`, `model-00001-of-00003.safetensors`
    (variant None); `model.fp16.safetensors`, `model.fp16-00001-of-00003.safetensors` (variant "fp16")."""
    files = sorted(folder.glob(f"*{WEIGHT_SUFFIX}"))
    stems = [(f, f.name[: -len(WEIGHT_SUFFIX)]) for f in files]
    if variant is None:
        return [f for f, stem in stems if "." not in stem]
    return [f for f, stem in stems if stem.endswith(f".{variant}") or f".{variant}-" in stem]


def _detect_variant(root: Path, requested: str | None) -> str | None:
    if requested is not None:
        return requested
    if not variant_files(root / "unet", None) and variant_files(root / "unet", "fp16"):
        return "fp16"
    return None


def open_model_dir(path: str | Path, *, variant: str | None = None, label: str | None = None) -> ModelSource:
    """Check `path` is a Kandinsky 3 folder in the diffusers layout and return a source for it."""
    root = Path(path)
    fix_layout = ("pass the folder written by `Kandinsky3Pipeline.save_pretrained` (or downloaded from "
                  "kandinsky-community/kandinsky-3), or use --preset tiny")
    if not root.is_dir():
        raise ModelSourceError(f"model folder {str(root)!r} does not exist", fix=fix_layout)
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelSourceError(f"{str(root)!r} has no model_index.json: not a diffusers pipeline folder",
                               fix=fix_layout)
    missing = [f for f in REQUIRED_FOLDERS if not (root / f).is_dir()]
    if missing:
        raise ModelSourceError(f"{str(root)!r} lacks the sub-folder(s) {', '.join(missing)}",
                               accepted="tokenizer/, text_encoder/, unet/, movq/, scheduler/", fix=fix_layout)
    declared = json.loads(index.read_text())
    for folder, cls in EXPECTED_CLASSES.items():
        entry = declared.get(folder)
        if not entry or entry[-1] != cls:
            raise ModelSourceError(f"model_index.json declares {folder} as {entry!r}",
                                   accepted=f"{cls} (a Kandinsky 3 pipeline)", fix=fix_layout)
    source = ModelSource(root, _detect_variant(root, variant), label or str(root))
    for folder in ("text_encoder", "unet", "movq"):
        if not source.weight_files(folder):
            raise ModelSourceError(
                f"no {'fp16 ' if source.variant else ''}safetensors weights in {str(root / folder)!r}",
                accepted="*.safetensors (fp32) or *.fp16.safetensors", fix="download the safetensors files; "
                ".bin/.pt pickles are refused because loading them can run arbitrary code")
    return source


def preset_source(name: str, *, seed: int = 0, damped: bool = True, log=print) -> ModelSource:
    from .presets import cached_preset

    folder = cached_preset(name, seed=seed, damped=damped, log=log)
    return open_model_dir(folder, label=f"preset {name}{'' if damped else ' (undamped)'} seed {seed}")
