"""Backends by name: the built-in ones (ONNX Runtime, TensorRT, OpenVINO) and those registered explicitly (the
PyTorch reference, from k3trt.verify). Kept apart from `base` so the backends import `base` and this module
imports them: one direction, no cycle."""
from __future__ import annotations

from typing import Callable, Mapping

from k3trt.contract.arguments import check_options
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import DEFAULT_MIN_PSNR_DB
from k3trt.runtime.backends.auto import (
    AUTO,
    AutoChoice,
    backend_options,
    check_min_psnr,
    choose_backend,
    choose_precision_auto,
    warn_from_records,
)
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


def make_backend(name: str, manifest: Manifest, precision: str | Mapping[str, str] = "fp32", *,
                 min_psnr: float = DEFAULT_MIN_PSNR_DB, **options) -> Backend:
    """The built-in backends by name (each imports its library, ONNX Runtime, TensorRT or OpenVINO, only when
    constructed); others (the torch reference) once registered. `name="auto"` picks the fastest fp32-exact
    backend installed and `precision="auto"` the fastest precision whose recorded quality meets `min_psnr`
    (runtime/backends/auto.py); what auto chose is the backend's `auto_choice`."""
    min_psnr = check_min_psnr(min_psnr)
    precision, measured_on, precision_reason = _auto_precision(name, manifest, precision, min_psnr)
    choice = None
    if name == AUTO:
        choice = choose_backend(precision, options)
        if measured_on is not None and measured_on != choice.backend:  # run it where qualify measured it
            choice = AutoChoice(measured_on, None, f"{precision} was qualified on {measured_on}")
        options, name = backend_options(choice, options), choice.backend
    if precision_reason is not None or choice is not None:
        choice = AutoChoice(name, precision if precision_reason else None,
                            "; ".join(r for r in (choice and choice.reason, precision_reason) if r))
    backend = _make(name, manifest, precision, options)
    backend.auto_choice = choice
    if precision_reason is None and name in ("ort", "openvino"):  # an explicit precision: its recorded figures, if any
        resolved = {c: backend.resolve(c).precision.value for c in ("unet",) if c in manifest.data["onnx"]}
        warn_from_records(manifest.data, resolved, name, options.get("provider", "cpu"), min_psnr=min_psnr)
    return backend


def _auto_precision(name: str, manifest: Manifest, precision, min_psnr: float):
    """`precision="auto"` -> (the chosen precision, the backend it was measured on, why); else unchanged."""
    if not (isinstance(precision, str) and precision.lower() == AUTO):
        return precision, None, None
    if name not in (AUTO, "ort", "openvino"):
        raise InvalidArgumentError(f"--precision auto with --backend {name}",
                                   accepted="--backend auto, ort or openvino (the CPU backends `k3trt qualify` "
                                            "measures)", fix="give the precision explicitly, or --backend auto")
    chosen, measured_on, reason = choose_precision_auto(manifest.data, min_psnr=min_psnr)
    if name != AUTO and measured_on not in (None, name):
        return "fp32", None, f"{reason}; but it was measured on {measured_on}, not {name}: fp32"
    return chosen, measured_on, reason


def _make(name: str, manifest: Manifest, precision, options: Mapping) -> Backend:
    if name in _REGISTERED:
        return _REGISTERED[name](manifest, precision, **options)
    if name in BUILTIN:
        return _construct(BUILTIN[name], name, manifest, precision, options)
    if name == "torch":
        raise BackendUnavailableError(
            "the torch reference backend is not registered in this process",
            fix="call k3trt.verify.torch_reference.register_torch_backend() first (it needs the [export] extra; "
                "`k3trt generate --backend torch` does it for you)")
    raise InvalidArgumentError(f"unknown backend {name!r}", accepted=", ".join([AUTO, *BUILTIN, *_REGISTERED]),
                               fix="--backend ort (ONNX Runtime) works everywhere")


def _construct(cls, name: str, manifest: Manifest, precision, options: Mapping) -> Backend:
    """Unknown keyword options are a typed error listing the real ones, not a TypeError."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    check_options(f"the {name!r} backend", options, [p.name for p in params if p.kind is p.KEYWORD_ONLY])
    return cls(manifest, precision, **options)
