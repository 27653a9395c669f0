"""The official Kandinsky 3 / 3.1 checkpoint layout (ai-forever/Kandinsky3.1 `weights/`) as an export source.

```
DIR/ (or DIR/weights/)
  kandinsky3.pt             {"unet": state dict, "null_embedding": tensor}   base U-Net          -> unet
  kandinsky3_inpainting.pt  same, 9-channel `in_layer`                         inpainting U-Net    -> unet_inpainting
  kandinsky3_flash.pt       same                                               3.1 Flash U-Net     -> unet_flash
  movq.pt                   MoVQ state dict                                                        -> movq
  flan_ul2_encoder/         transformers T5 folder (config, *.safetensors, tokenizer) with the text projections
                            projection.pt, projection_inpainting.pt, projection_flash.pt (Linear + LayerNorm)
  k3trt_official.json       optional: {"unet": {"groups": 32, "attention_head_dim": 64}} for non-standard sizes
```
File names are those of the official loaders (`kandinsky3/__init__.py`). Every `.pt` is read with
`torch.load(weights_only=True)`: a pickle that needs code execution is refused. Weights are mapped onto the
diffusers classes by `official_keys` (no conversion script is imported). The official code passes the
projection as part of the text encoder; diffusers' U-Net holds it as `encoder_hid_proj`, so each U-Net gets its
own projection file. Architecture numbers come from the weights' shapes; group count and head size are not in
the weights, so they default to the official 32 and 64 and may be overridden in `k3trt_official.json`.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

from k3trt.contract.errors import ModelSourceError
from k3trt.contract.manifest import sha256_file, sha256_json
from k3trt.export.model_variants import build_unet
from k3trt.export.official_keys import movq_key, projection_key, remap, unet_key
from k3trt.export.presets import SCHEDULER_CONFIG

UNET_FILES = {"unet": ("kandinsky3.pt", "projection.pt"),
              "unet_inpainting": ("kandinsky3_inpainting.pt", "projection_inpainting.pt"),
              "unet_flash": ("kandinsky3_flash.pt", "projection_flash.pt")}
MOVQ_FILE, T5_FOLDER, OVERRIDES = "movq.pt", "flan_ul2_encoder", "k3trt_official.json"
UNET_DEFAULTS = {"groups": 32, "attention_head_dim": 64}  # official get_T2I_unet / get_inpainting_unet
MOVQ_GROUPS = 32  # the official MoVQ's Normalize() hard-codes 32 groups


def safe_torch_load(path: Path):
    """`torch.load(weights_only=True)`; a pickle that needs code execution (or any non-checkpoint) is refused."""
    import torch

    try:
        try:  # memory-mapped: reading a config from a 12 GB checkpoint does not load its tensors
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"{str(path)!r} needs code execution to unpickle and was refused ({first})",
                               accepted="tensors and plain containers (torch.load(weights_only=True))",
                               fix="re-save it as a plain state dict (torch.save(model.state_dict(), path)) "
                                   "from a trusted environment") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelSourceError(f"{str(path)!r} is not a readable torch checkpoint ({exc})",
                               fix="re-download the file") from None


def is_official_layout(path: str | Path) -> bool:
    root = Path(path)
    return (root / "kandinsky3.pt").is_file() or (root / "weights" / "kandinsky3.pt").is_file() or \
        ((root / MOVQ_FILE).is_file() and (root / T5_FOLDER).is_dir())


def _levels(state: dict, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(pattern, k))})


def infer_unet_config(state: dict, projection: dict, overrides: dict) -> tuple[dict, int]:
    """diffusers Kandinsky3UNet config and input channels from official U-Net + projection shapes."""
    levels = _levels(state, r"^down_samples\.(\d+)\.")
    layers = _levels(state, r"^down_samples\.0\.resnet_attn_blocks\.(\d+)\.")
    if not levels or not layers or "in_layer.weight" not in state or "0.weight" not in projection:
        raise ModelSourceError("the U-Net checkpoint lacks in_layer / down_samples keys (or the projection its "
                               "'0.weight')", accepted="the official Kandinsky 3 UNet and projection state dicts")
    blocks = [state[f"down_samples.{i}.resnet_attn_blocks.0.0.resnet_blocks.3.projection.weight"].shape[0]
              for i in levels]
    config = dict(time_embedding_dim=state["to_time_embed.1.weight"].shape[0], layers_per_block=len(layers),
                  block_out_channels=blocks, cross_attention_dim=state["feature_pooling.attention.to_key.weight"]
                  .shape[1], encoder_hid_dim=projection["0.weight"].shape[1], **{**UNET_DEFAULTS, **overrides})
    return config, state["in_layer.weight"].shape[1]


def infer_movq_config(state: dict) -> dict:
    levels = _levels(state, r"^encoder\.down\.(\d+)\.")
    blocks = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in state) for i in levels]
    z = state["quant_conv.weight"].shape[0]
    return dict(in_channels=3, out_channels=3, latent_channels=z, vq_embed_dim=z, num_vq_embeddings=16384,
                block_out_channels=blocks, layers_per_block=len(_levels(state, r"^encoder\.down\.0\.block\.(\d+)\.")),
                norm_num_groups=MOVQ_GROUPS, norm_type="spatial", act_fn="silu",
                down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
                up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)])


@dataclasses.dataclass(frozen=True)
class OfficialSource:
    """Same interface as `sources.ModelSource`, over the official `.pt` layout."""
    root: Path  # the folder holding kandinsky3.pt etc.
    label: str
    variant: str | None = None

    # --- layout
    @property
    def tokenizer_dir(self) -> Path:
        return self.root / T5_FOLDER

    def folders(self) -> list[str]:
        return ["text_encoder", *[f for f, (pt, _) in UNET_FILES.items() if (self.root / pt).is_file()], "movq"]

    def has(self, folder: str) -> bool:
        return folder in self.folders() or folder == "scheduler"

    def _overrides(self) -> dict:
        path = self.root / OVERRIDES
        return json.loads(path.read_text()) if path.is_file() else {}

    def weight_files(self, folder: str) -> list[Path]:
        if folder == "text_encoder":
            return sorted((self.root / T5_FOLDER).glob("*.safetensors"))
        if folder == "movq":
            return [self.root / MOVQ_FILE]
        self._require(folder)
        pt, proj = UNET_FILES[folder]
        return [self.root / pt, self.root / T5_FOLDER / proj]

    def _require(self, folder: str) -> None:
        if folder not in UNET_FILES and folder not in ("text_encoder", "movq", "scheduler"):
            raise ModelSourceError(f"unknown component folder {folder!r}", accepted=", ".join(self.folders()))
        if folder in UNET_FILES:
            missing = [p for p in UNET_FILES[folder] if not ((self.root / p).is_file() or
                                                              (self.root / T5_FOLDER / p).is_file())]
            if missing:
                raise ModelSourceError(f"{str(self.root)!r} has no {', '.join(missing)} for {folder}",
                                       accepted=f"the official files {', '.join(UNET_FILES[folder])}",
                                       fix=f"download them from ai-forever/Kandinsky3.1 or leave {folder} out of "
                                           "--components")

    # --- metadata
    def config(self, folder: str) -> dict:
        if folder == "scheduler":
            return dict(SCHEDULER_CONFIG, _class_name="DDPMScheduler")
        if folder == "text_encoder":
            return json.loads((self.root / T5_FOLDER / "config.json").read_text())
        if folder == "movq":
            return infer_movq_config(self._state("movq"))
        state, projection, _ = self._unet_states(folder)
        config, channels = infer_unet_config(state, projection, self._overrides().get("unet", {}))
        return {**config, "in_channels": 4, "k3trt_sample_channels": channels}

    def source_hash(self, folder: str) -> str:
        weights = {f.name: sha256_file(f) for f in self.weight_files(folder)}
        return sha256_json({"layout": "official", "weights": weights, "overrides": self._overrides()})

    # --- loading (fp32, eval mode, one component at a time)
    def _state(self, folder: str):
        if folder == "movq":
            return safe_torch_load(self.root / MOVQ_FILE)
        raise ModelSourceError(f"no single state dict for {folder!r}")

    def _unet_states(self, folder: str) -> tuple[dict, dict, object]:
        self._require(folder)
        pt, proj = UNET_FILES[folder]
        checkpoint = safe_torch_load(self.root / pt)
        if not isinstance(checkpoint, dict) or "unet" not in checkpoint:
            raise ModelSourceError(f"{str(self.root / pt)!r} has no 'unet' entry",
                                   accepted="{'unet': state dict, 'null_embedding': tensor} (official layout)")
        null = checkpoint.get("null_embedding")
        null = None if null is None else null.reshape(-1).float()
        return checkpoint["unet"], safe_torch_load(self.root / T5_FOLDER / proj), null

    def null_embedding(self, folder: str):
        return self._unet_states(folder)[2]

    def load(self, folder: str):
        if folder == "text_encoder":
            return self._load_text_encoder()
        if folder == "movq":
            return self._load_movq()
        state, projection, null = self._unet_states(folder)
        config, channels = infer_unet_config(state, projection, self._overrides().get("unet", {}))
        unet = build_unet(config, channels)
        target = unet.state_dict()
        mapped = remap(state, unet_key, target, what=f"{folder} ({UNET_FILES[folder][0]})",
                       allowed_missing=tuple(k for k in target if k.startswith("encoder_hid_proj.")))
        mapped.update(remap(projection, projection_key, {k: v for k, v in target.items()
                                                         if k.startswith("encoder_hid_proj.")},
                            what=f"text projection ({UNET_FILES[folder][1]})"))
        unet.load_state_dict(mapped, strict=True)
        unet.k3trt_null_embedding = null  # read by the export wrapper (official_unet)
        return unet.float().eval()

    def _load_movq(self):
        import torch
        from diffusers import VQModel

        state = self._state("movq")
        config = infer_movq_config(state)
        movq = VQModel(**config)
        target = movq.state_dict()
        levels = len(config["block_out_channels"])
        # the official MoVQ has no codebook: Kandinsky 3 decodes with force_not_quantize, so it is never read
        mapped = remap(state, lambda k: movq_key(k, levels), target, what=f"MoVQ ({MOVQ_FILE})",
                       allowed_missing=("quantize.embedding.weight",))
        mapped["quantize.embedding.weight"] = torch.zeros_like(target["quantize.embedding.weight"])
        movq.load_state_dict(mapped, strict=True)
        return movq.float().eval()

    def _load_text_encoder(self):
        import torch
        from transformers import T5EncoderModel

        folder = self.root / T5_FOLDER
        if not self.weight_files("text_encoder"):
            raise ModelSourceError(f"no *.safetensors weights in {str(folder)!r}",
                                   fix="download the safetensors files of flan_ul2_encoder; .bin pickles are "
                                       "refused")
        return T5EncoderModel.from_pretrained(str(folder), torch_dtype=torch.float32, use_safetensors=True).eval()


def open_official_dir(path: str | Path, label: str | None = None) -> OfficialSource:
    root = Path(path)
    if (root / "weights" / "kandinsky3.pt").is_file() or (root / "weights" / MOVQ_FILE).is_file():
        root = root / "weights"
    missing = [name for name in (MOVQ_FILE, T5_FOLDER) if not (root / name).exists()]
    if missing or not any((root / pt).is_file() for pt, _ in UNET_FILES.values()):
        raise ModelSourceError(f"{str(root)!r} is not a complete official Kandinsky 3 folder (missing "
                               f"{', '.join(missing) or 'every U-Net .pt'})",
                               accepted="kandinsky3.pt (and/or kandinsky3_inpainting.pt, kandinsky3_flash.pt), "
                                        "movq.pt, flan_ul2_encoder/",
                               fix="download ai-forever/Kandinsky3.1 (its weights/ folder), or pass a diffusers "
                                   "folder")
    return OfficialSource(root, label or f"{root} (official layout)")
