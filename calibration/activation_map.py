"""Which torch module computes each activation the Q/DQ placement reads, derived from the weights.

The Q/DQ placement (`quantize.candidate_nodes`) quantizes the activation input of every Conv, Gemm and MatMul
with a constant weight. Each such node is one `nn.Conv*` or `nn.Linear` of the torch U-Net: its weight
initializer holds the module's weight (Conv: as is; Gemm: as is with transB=1, transposed otherwise; MatMul:
transposed). So the map is derived once per export by matching weight contents, not names: the exporter's node
and initializer names (`/unet/down_blocks.0/.../context_mlp/context_mlp.1/Gemm`, `onnx::MatMul_10137`) follow
its scope rules, the weights do not change. Modules with identical weights (untrained zero layers) are paired
with their nodes in the order each runs, which is the graph's order.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np

from k3trt.contract.errors import ModelSourceError

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class ActivationMap:
    """module qualified name -> the ONNX tensor its input is, per call of that module in one forward."""
    inputs: dict[str, tuple[str, ...]]

    @property
    def tensors(self) -> set[str]:
        return {name for names in self.inputs.values() for name in names}


def weight_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(repr(array.shape).encode() + array.tobytes()).hexdigest()


def node_weight(node, arrays) -> np.ndarray | None:
    """The node's weight in torch's orientation ([out, in, ...]); None for a node without a constant weight."""
    if len(node.input) < 2 or node.input[1] not in arrays:
        return None
    weight = arrays[node.input[1]]()
    if node.op_type == "MatMul":
        return weight.T
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return weight if trans_b else weight.T
    return weight


def onnx_weight_loaders(model, base_dir: Path) -> dict:
    """initializer name -> a function loading it (external data read one tensor at a time: bounded memory)."""
    from onnx import numpy_helper

    return {init.name: (lambda init=init: numpy_helper.to_array(init, str(base_dir)))
            for init in model.graph.initializer}


def module_digests(module, kinds: tuple) -> dict[str, list[str]]:
    """weight digest -> qualified names of the modules of `kinds` holding that weight, in definition order."""
    found: dict[str, list[str]] = {}
    for name, child in module.named_modules():
        if isinstance(child, kinds):
            found.setdefault(weight_digest(child.weight.detach().cpu().float().numpy()), []).append(name)
    return found


def derive(onnx_path: Path, module, candidates: Iterable) -> ActivationMap:
    """The map for `candidates` (the quantizer's candidate nodes of the ONNX at `onnx_path`) onto `module`
    (the torch wrapper that was exported). A node whose weight no module holds is a typed error: the model
    folder is not the one the ONNX came from."""
    import onnx
    import torch

    model = onnx.load(str(onnx_path), load_external_data=False)
    arrays = onnx_weight_loaders(model, Path(onnx_path).parent)
    modules = module_digests(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))
    taken: dict[str, int] = {}
    inputs: dict[str, list[str]] = {}
    unmatched = []
    for node in candidates:
        weight = node_weight(node, arrays)
        owners = modules.get(weight_digest(weight), []) if weight is not None else []
        if not owners:
            unmatched.append(node.name)
            continue
        digest = weight_digest(weight)
        owner = owners[min(taken.get(digest, 0), len(owners) - 1)]
        taken[digest] = taken.get(digest, 0) + 1
        inputs.setdefault(owner, []).append(node.input[0])
    if unmatched:
        raise ModelSourceError(
            f"{len(unmatched)} of the ONNX's quantizable nodes have weights no module of the torch model holds "
            f"(e.g. {', '.join(unmatched[:3])})",
            accepted="the model folder the fp32 ONNX was exported from",
            fix="pass --model with that folder, or re-export the artifacts from this one; --collector ort needs "
                "no model folder")
    return ActivationMap({name: tuple(names) for name, names in inputs.items()})
