"""The weight map: which ONNX initializer each torch parameter of a component became, written by the export.

Later stages change weights by name without re-tracing: LoRA adapters (runtime/lora.py), a same-configuration
checkpoint (export/weights_from.py) and TensorRT refit (engines/refit.py), whose parser names an engine's
refittable weights after the ONNX initializers. The tracer keeps a parameter's name only where the graph reads
it as is (Conv, Gemm, norms); constant folding turns `MatMul(x, Transpose(W))` of a Linear on 3-D input into a
new initializer `onnx::MatMul_123` holding W transposed, and the exporter merges parameters of equal value into
one initializer. So the map is made by name first, then by content (a digest of the parameter, and of its
transpose for a 2-D one), and it says for every parameter one of:
  - `initializer`, `shape`, `dtype`, `transpose` (the permutation that turns the parameter into the
    initializer, or null), and `shared_with` (other parameters stored in the same initializer, if any);
  - listed in `unused`: its module never runs in the exported forward (the MoVQ's encoder for the decoder);
  - listed in `unmapped` with a digest: folded into a computed constant (or constant-valued, so its content
    cannot tell which initializer it is), so it cannot be changed by name.
PEFT wraps adapted layers as `<layer>.base_layer`: `runtime/lora.py: canonical_parameter` maps those names
back to the plain ones before any lookup, so the map is keyed by the model's own names only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from k3trt.runtime.lora import canonical_parameter

WEIGHT_MAP_FORMAT = 1
WEIGHT_MAP_NAME = "weights.json"


def digest(array: np.ndarray) -> str:
    """Content key of a float32 tensor: shape and bytes (a transposed copy is contiguous before hashing)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()[:32]


def _constant_valued(array: np.ndarray) -> bool:
    return array.size <= 1 or bool(np.all(array.reshape(-1) == array.reshape(-1)[0]))


def initializer_index(model: onnx.ModelProto, base_dir: Path | None) -> tuple[dict, dict]:
    """(name -> (shape, ONNX dtype name), content digest -> [names]) of the main graph's float initializers."""
    by_name, by_digest = {}, {}
    for tensor in model.graph.initializer:
        by_name[tensor.name] = (tuple(tensor.dims), onnx.TensorProto.DataType.Name(tensor.data_type))
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor, str(base_dir) if base_dir else "")
        by_digest.setdefault(digest(array), []).append(tensor.name)
    return by_name, by_digest


def _entry(name: str, by_name: dict, transpose) -> dict:
    shape, dtype = by_name[name]
    return {"initializer": name, "shape": list(shape), "dtype": dtype, "transpose": transpose}


def _match(prefix: str, name: str, array: np.ndarray, by_name: dict, by_digest: dict) -> dict | None:
    """The parameter's initializer: by its traced name, else by content (itself, or transposed when 2-D)."""
    traced = prefix + name
    if traced in by_name and by_name[traced][0] == array.shape:
        return _entry(traced, by_name, None)
    if _constant_valued(array):
        return None  # a ones/zeros tensor matches any initializer of that value
    for candidate, perm in ((array, None), (array.T, [1, 0]) if array.ndim == 2 else (None, None)):
        if candidate is None:
            continue
        found = by_digest.get(digest(candidate), [])
        if len(found) == 1:
            return _entry(found[0], by_name, perm)
    return None


def used_modules(wrapper: torch.nn.Module, inputs: tuple) -> set[str]:
    """Names (relative to the wrapped component) of the modules the exported forward calls: the MoVQ decoder
    never runs the MoVQ's encoder, so those weights are not in the graph at all (rather than folded)."""
    prefix, called, handles = wrapper_prefix(wrapper), set(), []
    for name, sub in wrapper.named_modules(remove_duplicate=False):  # a tied module under each of its names
        handles.append(sub.register_forward_pre_hook(lambda m, a, name=name: called.add(name)))
    try:
        with torch.no_grad():
            wrapper(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {n[len(prefix):] if n.startswith(prefix) else "" for n in called if n.startswith(prefix)
            or n == prefix[:-1]}


def wrapper_tensors(wrapper: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The export wrapper's own tensors outside the component (the task U-Nets' learned `null_embedding`): they
    are weights of the graph too, named as the wrapper names them."""
    prefix = wrapper_prefix(wrapper)
    own = list(wrapper.named_parameters(remove_duplicate=False)) + list(wrapper.named_buffers(remove_duplicate=False))
    return [(name, tensor) for name, tensor in own if not name.startswith(prefix)]


def build_weight_map(module: torch.nn.Module, model: onnx.ModelProto, *, prefix: str,
                     base_dir: Path | None = None, config: dict | None = None, used: set[str] | None = None,
                     extras: list | None = None) -> dict:
    """The map of `module` (the diffusers/transformers component) against its exported graph `model`.
    `prefix`: the export wrapper's attribute (`unet.`), which the tracer puts before every parameter name.
    `used`: the modules the exported forward calls (`used_modules`); parameters of the others are `unused`."""
    by_name, by_digest = initializer_index(model, base_dir)
    params, unmapped, unused = {}, {}, []
    tensors = [(prefix, n, p) for n, p in module.named_parameters(remove_duplicate=False)]  # tied: every name
    tensors += [("", n, t) for n, t in extras or ()]
    for traced_prefix, name, param in tensors:
        array = param.detach().to(torch.float32).cpu().numpy()
        entry = _match(traced_prefix, name, array, by_name, by_digest)
        if entry is None and used is not None and name.rpartition(".")[0] not in used:
            unused.append(name)  # not found, and its module never ran: not in the graph at all
        elif entry is None:
            unmapped[name] = digest(array)
        else:
            params[name] = entry
    owners: dict[str, list[str]] = {}
    for name, entry in params.items():
        owners.setdefault(entry["initializer"], []).append(name)
    for name, entry in params.items():
        others = [o for o in owners[entry["initializer"]] if o != name]
        if others:
            entry["shared_with"] = others
    return {"format": WEIGHT_MAP_FORMAT, "prefix": prefix, "config": config or {}, "parameters": params,
            "unmapped": unmapped, "unused": unused}


def write_weight_map(weight_map: dict, folder: Path) -> Path:
    path = folder / WEIGHT_MAP_NAME
    path.write_text(json.dumps(weight_map, indent=1, sort_keys=True) + "\n")
    return path


def module_config(module: torch.nn.Module) -> dict:
    """The component's configuration as the library saves it (diffusers `config`, transformers `to_dict`)."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "transformers_version"}


def wrapper_prefix(wrapper: torch.nn.Module) -> str:
    """The export wrapper's attribute holding the component (`unet.`, `encoder.`, `movq.`)."""
    return next(name for name, _ in wrapper.named_children()) + "."


def initializer_values(weight_map: dict, tensors) -> tuple[dict[str, np.ndarray], list[str]]:
    """A checkpoint's parameters (an iterable of (name, tensor)) in initializer layout: initializer -> fp32
    array, and every problem (a name the graph lacks, a folded or shared weight whose value changed, a shape
    that differs, a mapped weight the checkpoint lacks). Empty problems: the graph can take these weights."""
    params, unmapped = weight_map["parameters"], weight_map.get("unmapped", {})
    unused = set(weight_map.get("unused", ()))
    values, problems, seen = {}, [], set()
    for name, tensor in tensors:
        name = canonical_parameter(name)
        if name in unused:  # not in the graph: any value does
            continue
        array = tensor.detach().to(torch.float32).cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor
        entry = params.get(name)
        if entry is None:
            if name not in unmapped:
                problems.append(f"{name}: not a parameter of the traced model")
            elif digest(array) != unmapped[name]:
                problems.append(f"{name}: changed, and folded into a computed constant at export")
            seen.add(name)
            continue
        if entry["transpose"]:
            array = array.transpose(entry["transpose"])
        if list(array.shape) != entry["shape"]:
            problems.append(f"{name}: shape {list(array.shape)}, the graph has {entry['shape']}")
            continue
        init = entry["initializer"]
        if init in values and not np.array_equal(values[init], array):
            problems.append(f"{name}: differs from {entry.get('shared_with')}, stored in one initializer")
        values[init] = np.ascontiguousarray(array, dtype=np.float32)
        seen.add(name)
    for name, entry in params.items():
        if name not in seen and entry["initializer"] not in values:
            problems.append(f"{name}: missing from the checkpoint")
    return values, problems
