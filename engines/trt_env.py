"""Lazy access to TensorRT and the GPU. Nothing here imports tensorrt at module import time.

Every entry point that needs TensorRT calls `require_tensorrt()` first, so a machine without it gets one
typed error saying what to install, not an ImportError from deep inside Polygraphy.
"""
from __future__ import annotations

import re

from k3trt.runtime.errors import BackendUnavailableError

from .compat import DeviceEnv

MIN_TRT_MAJOR = 10
INSTALL_HINT = ("pip install 'kandinsky3-trt[gpu]' on a Linux machine with an NVIDIA GPU and driver "
                "(it brings tensorrt>=10, polygraphy and cuda-python); a CUDA build of torch is needed too")


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise BackendUnavailableError saying what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but its CUDA libraries are not
        raise BackendUnavailableError(
            f"TensorRT is not usable on this machine ({type(exc).__name__}: {exc})",
            accepted=f"the `tensorrt` Python package, version {MIN_TRT_MAJOR}.x or newer", fix=INSTALL_HINT,
        ) from None
    version = getattr(trt, "__version__", "0")
    major = int(re.match(r"\d+", version).group()) if re.match(r"\d+", version) else 0
    if major < MIN_TRT_MAJOR or not hasattr(trt, "Builder"):
        raise BackendUnavailableError(f"tensorrt {version!r} is installed, but k3trt needs TensorRT "
                                      f"{MIN_TRT_MAJOR} or newer", accepted=f">= {MIN_TRT_MAJOR}.0",
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
