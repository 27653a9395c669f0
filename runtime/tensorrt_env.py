"""Lazy access to TensorRT and the GPU, and the supported TensorRT range. Nothing here imports tensorrt at
module import time.

Every entry point that needs TensorRT calls `require_tensorrt()` first, so a machine without it gets one
typed error saying what to install, not an ImportError from deep inside Polygraphy; a TensorRT outside the range
`pyproject.toml` declares (the `gpu` extra's `tensorrt` requirement) gets a TensorRTVersionError. The engine
stage and the runtime's TensorRT backend both import this module (the runtime never imports k3trt.engines).
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import re
from pathlib import Path

from k3trt.contract.engine_compat import DeviceEnv
from k3trt.contract.errors import BackendUnavailableError, TensorRTVersionError

DISTRIBUTION = "kandinsky3-trt"
INSTALL_HINT = ("pip install 'kandinsky3-trt[gpu-cu13]' (NVIDIA driver R580+) or 'kandinsky3-trt[gpu-cu12]' "
                "(driver R525+) on a Linux machine with an NVIDIA GPU: it brings a supported TensorRT for that CUDA "
                "major and Polygraphy; a CUDA build of torch of the same CUDA major is needed too")


@functools.lru_cache(maxsize=1)
def supported_tensorrt() -> str:
    """The supported TensorRT range, e.g. '<12,>=10.0', as pyproject.toml's gpu extra declares it (read from
    the installed package's metadata, or from pyproject.toml in a source checkout)."""
    try:
        requirements = md.requires(DISTRIBUTION) or []
    except md.PackageNotFoundError:
        requirements = []
    if not requirements:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        requirements = re.findall(r'"(tensorrt[^"]*)"', pyproject.read_text()) if pyproject.is_file() else []
    for requirement in requirements:  # tensorrt, tensorrt-cu12 or tensorrt-cu13 (the gpu-cu* extras)
        found = re.match(r"\s*tensorrt(?:[-_]cu\d+)?\s*([<>=!~][^;]*)", requirement)
        if found:
            return found.group(1).strip()
    raise BackendUnavailableError("pyproject.toml declares no supported TensorRT range (gpu extra)",
                                  fix="reinstall kandinsky3-trt")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_tensorrt_version(version: str) -> None:
    """TensorRTVersionError unless `version` is inside the supported range."""
    from packaging.specifiers import SpecifierSet

    spec = supported_tensorrt()
    release = ".".join(str(p) for p in _release(version)) or "0"
    if release not in SpecifierSet(spec):
        raise TensorRTVersionError(f"tensorrt {version!r} is installed, but k3trt supports TensorRT {spec}",
                                   accepted=f"tensorrt {spec} (TensorRT 10.x with strongly typed networks, 11.x)",
                                   fix=f"pip install 'tensorrt{spec}'")


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise BackendUnavailableError saying what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but its CUDA libraries are not
        raise BackendUnavailableError(
            f"TensorRT is not usable on this machine ({type(exc).__name__}: {exc})",
            accepted=f"the `tensorrt` Python package, {supported_tensorrt()}", fix=INSTALL_HINT,
        ) from None
    check_tensorrt_version(getattr(trt, "__version__", "0"))
    if not hasattr(trt, "Builder"):
        raise BackendUnavailableError(f"the `tensorrt` module at {getattr(trt, '__file__', '?')} has no Builder",
                                      fix=INSTALL_HINT)
    return trt


def require_cuda():
    """Return torch with a usable CUDA device, or raise BackendUnavailableError."""
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        raise BackendUnavailableError(
            f"no CUDA GPU is visible to torch {torch.__version__} (CUDA: {build})",
            accepted="an NVIDIA GPU with a working driver and a CUDA build of torch",
            fix="run on a machine with an NVIDIA GPU; install a CUDA torch wheel "
                "(pip install torch --index-url https://download.pytorch.org/whl/cu124)")
    return torch


def missing_requirements() -> list[str]:
    """Human-readable list of what is missing for GPU work (empty when TensorRT and a GPU are usable)."""
    missing = []
    for check in (require_tensorrt, require_cuda):
        try:
            check()
        except BackendUnavailableError as exc:
            missing.append(str(exc))
    return missing


def current_env(device: int = 0) -> DeviceEnv:
    trt = require_tensorrt()
    torch = require_cuda()
    return DeviceEnv(trt.__version__, torch.cuda.get_device_name(device),
                     tuple(torch.cuda.get_device_capability(device)))


def trt_logger():
    """Polygraphy's process-wide TensorRT logger: builder, runtime and refitter then share one logger."""
    require_tensorrt()
    from polygraphy.backend.trt.util import get_trt_logger

    return get_trt_logger()


def torch_dtype(trt_dtype):
    """trt.DataType -> torch.dtype for I/O buffers."""
    import torch

    trt = require_tensorrt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool, trt.bfloat16: torch.bfloat16}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if trt_dtype not in table:
        raise BackendUnavailableError(f"engine tensor type {trt_dtype} has no torch equivalent here",
                                      accepted=", ".join(str(k) for k in table))
    return table[trt_dtype]
