"""Backends by name: the built-in ones (ONNX Runtime, TensorRT, OpenVINO) and those registered explicitly (the
PyTorch reference, from k3trt.verify). Kept apart from `base` so the backends import `base` and this module
imports them: one direction, no cycle."""
from __future__ import annotations

from typing import Callable, Mapping

from k3trt.contract.arguments import check_options
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.base import Backend
from k3trt.runtime.backends.openvino import OpenVinoBackend
from k3trt.runtime.backends.ort import OrtBackend
from k3trt.runtime.backends.trt import TrtBackend

BUILTIN: dict[str, type[Backend]] = {"ort": OrtBackend, "trt": TrtBackend, "openvino": OpenVinoBackend}
_REGISTERED: dict[str, "Callable[..., Backend]"] = {}


def register_backend(name: str, factory) -> None:
    """Make `make_backend(name, ...)` call `factory(manifest, precision, **options)`. The torch reference backend
    is registered this way, explicitly (`k3trt.verify.torch_reference.register_torch_backend()`; the CLI does it
    for `--backend torch`), so the runtime never imports model code."""
    _REGISTERED[name] = factory


def make_backend(name: str, manifest: Manifest, precision: str | Mapping[str, str] = "fp32",
                 **options) -> Backend:
    """The built-in backends by name (each imports its library, ONNX Runtime, TensorRT or OpenVINO, only when
    constructed); others (the torch reference) once registered."""
    if name in _REGISTERED:
        return _REGISTERED[name](manifest, precision, **options)
    if name in BUILTIN:
        return _construct(BUILTIN[name], name, manifest, precision, options)
    if name == "torch":
        raise BackendUnavailableError(
            "the torch reference backend is not registered in this process",
            fix="call k3trt.verify.torch_reference.register_torch_backend() first (it needs the [export] extra; "
                "`k3trt generate --backend torch` does it for you)")
    raise InvalidArgumentError(f"unknown backend {name!r}", accepted=", ".join([*BUILTIN, *_REGISTERED]),
                               fix="--backend ort (ONNX Runtime) works everywhere")


def _construct(cls, name: str, manifest: Manifest, precision, options: Mapping) -> Backend:
    """Unknown keyword options are a typed error listing the real ones, not a TypeError."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    check_options(f"the {name!r} backend", options, [p.name for p in params if p.kind is p.KEYWORD_ONLY])
    return cls(manifest, precision, **options)
