"""Model sources: a diffusers-layout folder (`Kandinsky3Pipeline.save_pretrained`) or a preset.

Only safetensors weights are loaded (`use_safetensors=True`): never a pickle.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from k3trt.contract.arguments import check_path
from k3trt.contract.errors import ModelSourceError
from k3trt.contract.manifest import sha256_file, sha256_json

REQUIRED_FOLDERS = ("tokenizer", "text_encoder", "unet", "movq", "scheduler")
OPTIONAL_FOLDERS = ("unet_inpainting", "unet_flash")  # k3trt's own layout for the U-Net variants (unet_variants)
EXPECTED_CLASSES = {"text_encoder": "T5EncoderModel", "unet": "Kandinsky3UNet", "movq": "VQModel",
                    "scheduler": "DDPMScheduler"}
WEIGHT_SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    root: Path
    variant: str | None  # None for plain fp32 files, "fp16" for `*.fp16.safetensors`
    label: str  # "preset tiny" or the folder path, for messages and the manifest

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def folders(self) -> list[str]:
        return ["text_encoder", "unet", *[f for f in OPTIONAL_FOLDERS if (self.root / f).is_dir()], "movq"]

    def has(self, folder: str) -> bool:
        return folder in self.folders() or folder == "scheduler"

    def null_embedding(self, folder: str):
        """The learned unconditional embedding of a U-Net variant (None for the diffusers base U-Net)."""
        from k3trt.export.model_variants import load_variant

        return load_variant(self.root / folder)[1] if folder in OPTIONAL_FOLDERS else None

    # --- metadata
    def config(self, folder: str) -> dict:
        path = self.root / folder / ("scheduler_config.json" if folder == "scheduler" else "config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ModelSourceError(f"cannot read {str(path)!r}: {str(exc)[:200]}",
                                   fix="re-download or re-save the model folder") from None
        if not isinstance(data, dict):
            raise ModelSourceError(f"{str(path)!r} is not a JSON object", fix="re-download or re-save the folder")
        return data

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
        if folder in OPTIONAL_FOLDERS:
            from k3trt.export.model_variants import load_variant

            if not self.has(folder):
                raise ModelSourceError(f"{str(self.root)!r} has no {folder}/ folder",
                                       fix=f"rewrite the preset with this version (`k3trt preset tiny --out DIR`) "
                                           f"or leave {folder} out of --components")
            return load_variant(self.root / folder)[0]
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

    root = check_path("model", path)
    fix_layout = ("pass the folder written by `Kandinsky3Pipeline.save_pretrained` (or downloaded from "
                  "kandinsky-community/kandinsky-3), or use --preset tiny")
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise ModelSourceError(f"model folder {str(root)!r} {state}", fix=fix_layout)
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelSourceError(f"{str(root)!r} has no model_index.json: not a diffusers pipeline folder",
                               fix=fix_layout)
    missing = [f for f in REQUIRED_FOLDERS if not (root / f).is_dir()]
    if missing:
        raise ModelSourceError(f"{str(root)!r} lacks the sub-folder(s) {', '.join(missing)}",
                               accepted="tokenizer/, text_encoder/, unet/, movq/, scheduler/", fix=fix_layout)
    try:
        declared = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ModelSourceError(f"{str(index)!r} is not valid JSON ({str(exc)[:100]})", fix=fix_layout) from None
    if not isinstance(declared, dict):
        raise ModelSourceError(f"{str(index)!r} is not a JSON object", fix=fix_layout)
    for folder, cls in EXPECTED_CLASSES.items():
        entry = declared.get(folder)
        if not isinstance(entry, list) or not entry or entry[-1] != cls:
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


def open_source_dir(path: str | Path, *, variant: str | None = None):
    """A diffusers-layout folder, or the official `.pt` layout (ai-forever/Kandinsky3.1 `weights/`)."""
    from k3trt.export.official import is_official_layout, open_official_dir

    if is_official_layout(path) and not (Path(path) / "model_index.json").is_file():
        return open_official_dir(path)
    return open_model_dir(path, variant=variant)


def preset_source(name: str, *, seed: int = 0, damped: bool = True, log=print) -> ModelSource:
    from k3trt.export.presets import cached_preset

    folder = cached_preset(name, seed=seed, damped=damped, log=log)
    return open_model_dir(folder, label=f"preset {name}{'' if damped else ' (undamped)'} seed {seed}")
