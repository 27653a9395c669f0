"""LoRA adapter files, read with safetensors and json only (the runtime never imports peft or diffusers).

Formats read (each layer becomes `up @ down` scaled by alpha / rank, PEFT's `scaling`):
- a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`): keys
  `base_model.model.<module>.lora_A.weight` / `lora_B.weight`; `r`, `lora_alpha`, `rank_pattern`,
  `alpha_pattern` and `use_rslora` from the config as PEFT reads them;
- a diffusers single file (`pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight` (PEFT naming, rank
  and alpha from the file's `lora_adapter_metadata` when present, else alpha = rank) or the older
  `unet.<module>.lora.down.weight` / `lora.up.weight`;
- a kohya single file: `lora_unet_<module with _ for .>.lora_down.weight` / `lora_up.weight` / `.alpha`; its
  module names are resolved against the artifacts' weight map (runtime/lora.py), refused where ambiguous.
Anything else (DoRA magnitudes, LoHa/LoKr, unknown keys) is a typed error listing the keys.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from k3trt.contract.errors import AdapterError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
COMPONENT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "lora_unet": "unet",
                      "lora_te": "text_encoder", "lora_te1": "text_encoder"}
SHOW = 8


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: delta W = scaling * up @ down (conv kernels flattened past the first axis)."""
    module: str  # the model's module name (`down_blocks.0.attentions.0.to_q`), or kohya's mangled one
    down: np.ndarray  # (rank, in, ...) PEFT's lora_A
    up: np.ndarray  # (out, rank, ...) PEFT's lora_B
    scaling: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
    mangled: bool = False  # kohya: `module` has `_` for `.`, resolved against the weight map

    def delta(self) -> np.ndarray:
        up, down = self.up.astype(np.float32), self.down.astype(np.float32)
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (product * np.float32(self.scaling)).reshape((up.shape[0],) + down.shape[1:])


@dataclasses.dataclass(frozen=True)
class Adapter:
    path: str
    component: str | None  # None: a PEFT folder, which names no component (resolved by the weight maps)
    layers: tuple[LoraLayer, ...]


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOW]) + (f" ... and {len(names) - SHOW} more" if len(names) > SHOW else "")


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise AdapterError(f"cannot read LoRA weights {str(path)!r}: {exc}",
                           accepted="a safetensors file saved by PEFT, diffusers or kohya",
                           fix="re-save the adapter with `save_pretrained` (safetensors)") from None


def _pattern_value(module: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _scaling(module: str, rank: int, config: dict) -> float:
    r = _pattern_value(module, config.get("rank_pattern") or {}, config.get("r", rank))
    alpha = _pattern_value(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _pairs(tensors: dict, down: str, up: str, strip: str, path: str) -> tuple[dict, set]:
    """module -> (down, up) for keys `<strip><module><down|up>`; returns also the keys left over."""
    pairs, used = {}, set()
    for key in tensors:
        if key.startswith(strip) and key.endswith(down):
            module = key[len(strip):-len(down)]
            partner = f"{strip}{module}{up}"
            if partner not in tensors:
                raise AdapterError(f"{path}: {key!r} has no {partner!r}", fix="re-save the adapter; it is incomplete")
            pairs[module] = (tensors[key], tensors[partner])
            used.update((key, partner))
    return pairs, set(tensors) - used


def _refuse_left(left: set, path: str, form: str) -> None:
    if left:
        raise AdapterError(f"{path}: {len(left)} key(s) are not LoRA A/B weights of the {form} format: "
                           f"{_listing(left)}", accepted="plain LoRA (lora_A/lora_B, lora_down/lora_up, alpha)",
                           fix="merge other adapter types (DoRA, LoHa, LoKr) into the weights and use "
                               "`k3trt export --weights-from`")


def read_peft_folder(folder: Path) -> Adapter:
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {str(folder / PEFT_CONFIG)!r}: {exc}",
                           fix="pass the folder PEFT's save_pretrained wrote") from None
    if config.get("use_dora") or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: a {config.get('peft_type')} adapter (use_dora={config.get('use_dora')})",
                           accepted="plain LoRA adapters", fix="merge it into the weights and use "
                                                              "`k3trt export --weights-from`")
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {PEFT_WEIGHTS}", fix="save with safe_serialization=True (PEFT's default)")
    tensors, _ = _read_safetensors(weights)
    pairs, left = _pairs(tensors, ".lora_A.weight", ".lora_B.weight", "base_model.model.", str(folder))
    _refuse_left(left, str(folder), "PEFT")
    layers = tuple(LoraLayer(m, d, u, _scaling(m, d.shape[0], config)) for m, (d, u) in sorted(pairs.items()))
    return Adapter(str(folder), None, layers)


def _split_component(pairs: dict, path: str, separator: str) -> tuple[str, dict]:
    """One component per adapter file: `unet` / `text_encoder` (diffusers), `lora_unet` / `lora_te` (kohya)."""
    found = {}
    for module, pair in pairs.items():
        head, _, rest = module.partition(separator)
        if head not in COMPONENT_PREFIXES or not rest:
            raise AdapterError(f"{path}: key prefix {head!r} names no component", accepted=_listing(COMPONENT_PREFIXES))
        found.setdefault(COMPONENT_PREFIXES[head], {})[rest] = pair
    if len(found) != 1:
        raise AdapterError(f"{path}: adapts {sorted(found)} in one file", accepted="one component per adapter",
                           fix="split the file per component (keys unet.* / text_encoder.*)")
    return next(iter(found.items()))


def read_single_file(path: Path) -> Adapter:
    tensors, metadata = _read_safetensors(path)
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in tensors):
        return _kohya(tensors, str(path))
    down, up = ((".lora_A.weight", ".lora_B.weight") if any(".lora_A." in k for k in tensors)
                else (".lora.down.weight", ".lora.up.weight"))
    pairs, left = _pairs(tensors, down, up, "", str(path))
    _refuse_left(left, str(path), "diffusers")
    component, pairs = _split_component(pairs, str(path), ".")
    config = json.loads(metadata.get("lora_adapter_metadata", "{}")).get(component, {}) if metadata else {}
    layers = tuple(LoraLayer(m, d, u, _scaling(m, d.shape[0], config) if config else 1.0)
                   for m, (d, u) in sorted(pairs.items()))
    return Adapter(str(path), component, layers)


KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder"}


def _kohya(tensors: dict, path: str) -> Adapter:
    """kohya naming: `lora_unet_<module, . as _>` with an optional `.alpha` per layer (absent: alpha = rank)."""
    alphas = {k[:-len(".alpha")]: float(np.asarray(v).reshape(-1)[0]) for k, v in tensors.items()
              if k.endswith(".alpha")}
    rest = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    pairs, left = _pairs(rest, ".lora_down.weight", ".lora_up.weight", "", path)
    _refuse_left(left, path, "kohya")
    layers, components = [], set()
    for name, (down, up) in sorted(pairs.items()):
        prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise AdapterError(f"{path}: key {name!r} names no component", accepted=_listing(KOHYA_PREFIXES))
        components.add(KOHYA_PREFIXES[prefix])
        scaling = alphas.get(name, down.shape[0]) / down.shape[0]
        layers.append(LoraLayer(name[len(prefix):], down, up, scaling, mangled=True))
    if len(components) != 1:
        raise AdapterError(f"{path}: adapts {sorted(components)} in one file", accepted="one component per adapter",
                           fix="split the file per component")
    return Adapter(path, components.pop(), tuple(layers))


def read_adapter(path: str | Path) -> Adapter:
    """An adapter from a PEFT folder or a single safetensors file (diffusers or kohya naming)."""
    path = Path(path)
    if path.is_dir():
        return read_peft_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        return read_single_file(path)
    raise AdapterError(f"LoRA {str(path)!r} is neither a PEFT adapter folder nor a .safetensors file",
                       accepted=f"a folder with {PEFT_CONFIG} + {PEFT_WEIGHTS}, or a .safetensors file",
                       fix="pass the folder `save_pretrained` wrote, or a LoRA .safetensors file")
