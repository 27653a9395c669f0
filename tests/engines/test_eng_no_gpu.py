"""Without TensorRT or a GPU every GPU entry point fails with a typed error that says what to install."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from k3trt.runtime import tensorrt_env as trt_env
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.registry import make_backend
from k3trt.cli.main import main
from k3trt.contract.errors import BackendUnavailableError


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


no_trt = pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed here")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")


@no_trt
def test_require_tensorrt_names_the_extra():
    with pytest.raises(BackendUnavailableError) as err:
        trt_env.require_tensorrt()
    message = str(err.value)
    assert "pip install 'kandinsky3-trt[gpu-cu13]'" in message and "'kandinsky3-trt[gpu-cu12]'" in message
    assert "R580" in message and "tensorrt" in message


def test_too_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1", Builder=object))
    with pytest.raises(BackendUnavailableError, match="supports TensorRT <12,>=10.0"):
        trt_env.require_tensorrt()


@no_gpu
def test_require_cuda_explains_the_cpu_build():
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        trt_env.require_cuda()


@no_trt
def test_trt_backend_construction_fails_typed(tiny_artifacts):
    with pytest.raises(BackendUnavailableError, match="kandinsky3-trt\\[gpu-cu13\\]"):
        make_backend("trt", Manifest.load(tiny_artifacts), "fp16")


@no_trt
def test_refit_without_tensorrt(tiny_artifacts, tmp_path, capsys):
    rc = main(["refit", "--artifacts", str(tiny_artifacts), "--model", str(tmp_path)])
    assert rc == 2 and "BackendUnavailableError" in capsys.readouterr().err


@no_trt
def test_selftest_gpu_says_what_is_missing(capsys):
    assert main(["selftest", "--gpu"]) == 1
    err = capsys.readouterr().err
    assert "selftest --gpu cannot run here" in err and "tensorrt" in err
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in err
    assert len(trt_env.missing_requirements()) == (1 if torch.cuda.is_available() else 2)
