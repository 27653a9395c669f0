"""LoRA adapters on exported artifacts, without re-export: adapter layers -> ONNX initializers -> new weights.

Each component's export wrote a weight map (`weights.json`, export/weight_map.py): parameter name ->
initializer, shape, dtype and the transpose that turns the parameter into the initializer. An adapter layer on
module `m` changes `m.weight`; its delta `scale * scaling * up @ down` is transposed like the parameter and
added to the base initializer read from the variant's ONNX file: `W + sum_i scale_i * delta_i`, in fp32, cast
to the initializer's type. Only changed initializers are produced; the backend swaps them in (ONNX Runtime:
session initializers; TensorRT: refit by name), and an empty set brings back the base weights, which were
never modified (the ONNX files are read, not written).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from k3trt.contract.errors import AdapterError, ArtifactError, InvalidArgumentError
from k3trt.contract.manifest import FileRecord, Manifest, check_external_data_paths, inside
from k3trt.runtime.lora_files import SHOW, Adapter, LoraLayer, read_adapter

ADAPTABLE = ("unet", "text_encoder")  # components an adapter may target (the task U-Nets share unet's names)


@dataclasses.dataclass(frozen=True)
class LoraChoice:
    adapter: Adapter
    scale: float = 1.0


def canonical_parameter(name: str) -> str:
    """PEFT wraps an adapted layer as `<layer>.base_layer`; its weight is the layer's own."""
    return name.replace(".base_layer.", ".")


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` (the scale defaults to 1; a path that itself holds `:` needs an explicit scale)."""
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError(f"--lora {text!r}", accepted="PATH or PATH:SCALE", fix="e.g. --lora style-lora:0.8")
    path, _, tail = text.rpartition(":")
    try:
        scale = float(tail) if path else None
    except ValueError:
        scale = None
    if scale is None:
        return text, 1.0
    if not math.isfinite(scale) or abs(scale) > 100:
        raise InvalidArgumentError(f"LoRA scale {tail!r} in {text!r}", accepted="a finite number in -100..100",
                                   fix="e.g. PATH:0.8")
    return path, scale


def load_loras(loras) -> tuple[LoraChoice, ...]:
    """None, one spec, or a list of: `"PATH[:SCALE]"`, a Path, `(path, scale)`, an Adapter or a LoraChoice."""
    if loras is None:
        return ()
    single_pair = isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float)) \
        and not isinstance(loras[0], (LoraChoice, tuple))
    if isinstance(loras, (str, Path, Adapter, LoraChoice)) or single_pair:
        loras = [loras]
    if not isinstance(loras, Sequence):
        raise InvalidArgumentError(f"lora={loras!r}", accepted='None, "PATH[:SCALE]", (path, scale), or a list')
    return tuple(_choice(item) for item in loras)


def _choice(item) -> LoraChoice:
    if isinstance(item, LoraChoice):
        return item
    if isinstance(item, Adapter):
        return LoraChoice(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, float)):
        path, scale = item
        parse_lora_spec(f"x:{float(scale)}")  # the same range check
        return LoraChoice(item[0] if isinstance(item[0], Adapter) else read_adapter(item[0]), float(scale))
    if isinstance(item, Path):
        return LoraChoice(read_adapter(item))
    if isinstance(item, str):
        path, scale = parse_lora_spec(item)
        return LoraChoice(read_adapter(path), scale)
    raise InvalidArgumentError(f"LoRA {item!r}", accepted='"PATH[:SCALE]", a Path, (path, scale) or an Adapter')


# ----------------------------------------------------------------------------------------- weight maps
class WeightMap:
    """One component's weights.json (verified against the manifest's sha256)."""

    def __init__(self, manifest: Manifest, component: str):
        record = manifest.onnx(component)
        entry = record.extra.get("weight_map")
        if not entry:
            raise ArtifactError(f"the {component} export in {manifest.root} has no weight map",
                                fix="re-export with this version (`k3trt export --force`); it records which "
                                    "initializer each weight became")
        file = FileRecord(**entry)
        manifest.verify([file])
        data = json.loads(manifest.path(file.path).read_text())
        self.component, self.parameters = component, data["parameters"]
        self.unmapped, self.config = data.get("unmapped", {}), data.get("config", {})
        self._mangled = None

    def entry(self, parameter: str) -> dict | None:
        return self.parameters.get(canonical_parameter(parameter))

    def module_of(self, layer: LoraLayer) -> str | None:
        """The module a layer adapts; kohya's `_`-for-`.` names only where exactly one module fits."""
        if not layer.mangled:
            return canonical_parameter(layer.module + ".")[:-1]
        if self._mangled is None:
            modules = {p.rsplit(".", 1)[0] for p in list(self.parameters) + list(self.unmapped)}
            self._mangled = {}
            for module in modules:
                self._mangled.setdefault(module.replace(".", "_"), []).append(module)
        found = self._mangled.get(layer.module, [])
        return found[0] if len(found) == 1 else None


def _target(layer: LoraLayer, weights: WeightMap) -> tuple[str, dict | None, str | None]:
    """(parameter, map entry, why not) for one layer."""
    module = weights.module_of(layer)
    if module is None:
        return layer.module, None, "no module of that name (or several, for a kohya name)"
    parameter = f"{module}.weight"
    entry = weights.entry(parameter)
    if entry is None:
        why = "folded into a computed constant at export" if parameter in weights.unmapped else "not in the model"
        return parameter, None, why
    if entry.get("shared_with"):
        return parameter, None, f"stored in one initializer with {entry['shared_with'][:3]}"
    return parameter, entry, None


def _component_of(adapter: Adapter, maps: Mapping[str, WeightMap]) -> str:
    """The adapter's component: named by the file, else the one whose weight map holds every layer."""
    if adapter.component is not None:
        return adapter.component
    fits = [c for c, m in maps.items() if all(_target(layer, m)[1] is not None for layer in adapter.layers)]
    return fits[0] if fits else "unet"


def adapter_deltas(adapter: Adapter, weights: WeightMap, scale: float) -> dict[str, np.ndarray]:
    """initializer name -> scale * delta in the initializer's layout; every layer mapped, or a typed error."""
    deltas, refused = {}, []
    for layer in adapter.layers:
        parameter, entry, why = _target(layer, weights)
        if entry is None:
            refused.append(f"{layer.module} ({parameter}: {why})")
            continue
        delta = layer.delta()
        if entry["transpose"]:
            delta = delta.transpose(entry["transpose"])
        if list(delta.shape) != entry["shape"]:
            refused.append(f"{layer.module} (delta {list(delta.shape)} vs weight {entry['shape']})")
            continue
        name = entry["initializer"]
        deltas[name] = deltas.get(name, 0) + np.float32(scale) * np.ascontiguousarray(delta)
    if refused:
        raise AdapterError(f"{adapter.path}: {len(refused)} of {len(adapter.layers)} LoRA layer(s) do not map to "
                           f"the {weights.component} artifacts' weights: " + "; ".join(refused[:SHOW])
                           + (f" ... and {len(refused) - SHOW} more" if len(refused) > SHOW else ""),
                           accepted="adapters for the model these artifacts were exported from",
                           fix="check the adapter was trained on this model (same config); merge it and use "
                               "`k3trt export --weights-from` otherwise")
    return deltas


def blended_deltas(manifest: Manifest, choices: Sequence[LoraChoice]) -> dict[str, dict[str, np.ndarray]]:
    """component -> initializer -> the summed deltas of every chosen adapter (each with its own scale)."""
    maps = {c: WeightMap(manifest, c) for c in ADAPTABLE if manifest.has_onnx(c) and choices}
    out: dict[str, dict[str, np.ndarray]] = {}
    for choice in choices:
        component = _component_of(choice.adapter, maps)
        if component not in maps:
            raise AdapterError(f"{choice.adapter.path} adapts {component}, which these artifacts lack",
                               accepted=", ".join(maps) or "none", fix="export that component first")
        for name, delta in adapter_deltas(choice.adapter, maps[component], choice.scale).items():
            target = out.setdefault(component, {})
            target[name] = target.get(name, 0) + delta
    return out


# ----------------------------------------------------------------------------------------- base weights
def read_initializers(manifest: Manifest, graph_path: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named initializers of one ONNX file as stored (inline or external data), nothing else loaded."""
    import onnx
    from onnx import numpy_helper

    path = manifest.path(graph_path)
    check_external_data_paths(path, manifest.root)
    model = onnx.load(str(path), load_external_data=False)
    wanted, out = set(names), {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted:
            out[tensor.name] = _external(tensor, path.parent) if tensor.data_location == onnx.TensorProto.EXTERNAL \
                else numpy_helper.to_array(tensor)
    missing = wanted - set(out)
    if missing:
        raise ArtifactError(f"{graph_path} lacks initializer(s) {sorted(missing)[:SHOW]}",
                            fix="re-export the component (and its variants); the weight map and graph disagree")
    return out


def _external(tensor, folder: Path) -> np.ndarray:
    """One externally stored initializer, read at its offset (the rest of the data file stays on disk)."""
    from onnx import helper

    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    with open(inside(folder, info["location"]), "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return np.frombuffer(handle.read(count * np.dtype(dtype).itemsize), dtype=dtype).reshape(tuple(tensor.dims))


def apply_deltas(base: Mapping[str, np.ndarray], deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """W + delta in fp32, back to each initializer's type (fp32, fp16)."""
    out = {}
    for name, delta in deltas.items():
        weight = base[name]
        if weight.dtype not in (np.float32, np.float16):
            raise InvalidArgumentError(f"LoRA on a {weight.dtype} initializer ({name})", accepted="fp32 or fp16 "
                                       "variants", fix="run the component in fp32 or fp16 (--precision)")
        out[name] = np.ascontiguousarray(weight.astype(np.float32) + delta).astype(weight.dtype)
    return out


def weight_overrides(manifest: Manifest, graphs: Mapping[str, str], choices: Sequence[LoraChoice]
                     ) -> dict[str, dict[str, np.ndarray]]:
    """component -> initializer -> new weight, for `graphs` (component -> the ONNX path its backend runs)."""
    out = {}
    for component, deltas in blended_deltas(manifest, choices).items():
        base = read_initializers(manifest, graphs[component], list(deltas))
        out[component] = apply_deltas(base, deltas)
    return out
