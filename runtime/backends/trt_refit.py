"""Refit a deserialized TensorRT engine by weight name, with only the weights that change.

TensorRT's ONNX parser names an engine's refittable weights after the ONNX initializers, so the weight map's
initializer names (export/weight_map.py) are the engine's names. Each new weight goes in through
`Refitter.set_named_weights` as a host tensor of the type `get_weights_prototype` reports; weights TensorRT then
still asks for (`get_missing_weights`: e.g. the partner of a weight fused with it at build time) are supplied
from `base(names)`, the values the engine was built with, so nothing else changes. Used by the TensorRT backend
(LoRA, runtime/lora.py) and by `k3trt refit` (engines/refit.py).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from k3trt.contract.errors import AdapterError, ArtifactError

SHOW = 8


def _host(trt, array: np.ndarray, trt_dtype, count: int, name: str):
    """A contiguous host copy in the engine weight's type (fp32, fp16, bf16; converted from fp32/fp16)."""
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if trt_dtype not in table:
        raise AdapterError(f"engine weight {name!r} is {trt_dtype}", accepted="float32, float16 or bfloat16 weights",
                           fix="int8/fp8 weights cannot be changed by refit; rebuild from new artifacts")
    source = np.ascontiguousarray(array, dtype=np.float16 if array.dtype == np.float16 else np.float32)
    tensor = torch.from_numpy(source).to(table[trt_dtype]).contiguous()
    if tensor.numel() != count:
        raise AdapterError(f"weight {name!r} has {tensor.numel()} values; the engine holds {count}",
                           fix="the engine was built from another model; rebuild it (k3trt build --refittable)")
    return tensor


def set_weights(trt, refitter, weights: Mapping[str, np.ndarray], alive: list) -> None:
    """`set_named_weights` for each (host copies appended to `alive`: they must outlive the refit)."""
    for name, array in weights.items():
        prototype = refitter.get_weights_prototype(name)
        tensor = _host(trt, array, prototype.dtype, int(prototype.size), name)
        alive.append(tensor)
        if not refitter.set_named_weights(name, trt.Weights(prototype.dtype, tensor.data_ptr(), tensor.numel())):
            raise ArtifactError(f"TensorRT rejected new weights for {name!r}",
                                fix="rebuild the engine with k3trt build --refittable")


def refit_named(trt, engine, weights: Mapping[str, np.ndarray], base: Callable[[Sequence[str]], Mapping],
                engine_name: str, logger) -> int:
    """Refit `engine` in place with `weights` (initializer name -> array); returns the number of weights set."""
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - refittable)
    if unknown:
        raise AdapterError(f"engine {engine_name!r} has no refittable weight named {unknown[:SHOW]}"
                           + (f" ... and {len(unknown) - SHOW} more" if len(unknown) > SHOW else ""),
                           accepted=f"{len(refittable)} refittable weights named after the ONNX initializers",
                           fix="build the engine with --refittable from these artifacts (`k3trt build "
                               "--refittable`); int8 engines cannot take new weights")
    alive: list = []
    set_weights(trt, refitter, weights, alive)
    partners = [n for n in refitter.get_missing_weights() if n not in weights]
    if partners:
        set_weights(trt, refitter, base(partners), alive)
    missing = list(refitter.get_missing_weights())
    if missing or not refitter.refit_cuda_engine():
        raise ArtifactError(f"refit of {engine_name!r} failed; missing weights: {missing[:SHOW] or 'none'}",
                            fix="rebuild the engine with k3trt build --refittable")
    return len(weights) + len(partners)
