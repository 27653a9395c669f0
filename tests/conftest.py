"""Shared fixtures: one tiny preset and one exported artifact directory per test session (~35 s on 2 cores)."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

TRT_SIM = Path(__file__).resolve().parent / "trt_sim"  # holds the TensorRT stand-in package `tensorrt/`
_SIM_MODULE = []  # one stand-in module per session: Polygraphy's lazy importer keeps the first it gets


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Presets built by code under test go to a session folder, not the user's ~/.cache."""
    old = os.environ.get("K3TRT_CACHE")
    os.environ["K3TRT_CACHE"] = str(tmp_path_factory.mktemp("k3trt-cache"))
    yield
    if old is None:
        os.environ.pop("K3TRT_CACHE", None)
    else:
        os.environ["K3TRT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny preset (damped) written in the diffusers layout. Read-only for tests: copy before changing."""
    from k3trt.export.presets import write_preset

    return write_preset("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_model_dir, tmp_path_factory) -> Path:
    """All three components of the tiny preset exported and validated. Read-only: use `artifacts_copy`."""
    from k3trt.export.sources import open_model_dir
    from k3trt.export.writer import export_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_artifacts(open_model_dir(tiny_model_dir), out, log=lambda *_: None)
    return out


@pytest.fixture()
def artifacts_copy(tiny_artifacts, tmp_path) -> Path:
    """A private copy of the tiny artifacts that a test may modify or tamper with."""
    dest = tmp_path / "art"
    shutil.copytree(tiny_artifacts, dest)
    return dest


@contextlib.contextmanager
def installed_trt_sim():
    """The TensorRT stand-in (tests/trt_sim/tensorrt) as `import tensorrt`, reset to its defaults (TensorRT 11.4
    on a simulated A100, compute capability 8.0), and torch's CUDA device queries answering for that GPU (what
    `k3trt.runtime.tensorrt_env.current_env` reads). Removed from sys.modules afterwards, so tests outside the
    `trt_sim` marker still see a machine without TensorRT."""
    import torch

    if not _SIM_MODULE:
        sys.path.insert(0, str(TRT_SIM))
        try:
            sys.modules.pop("tensorrt", None)
            import tensorrt
        finally:
            sys.path.remove(str(TRT_SIM))
            sys.modules.pop("tensorrt", None)  # kept in _SIM_MODULE; installed below, with `previous` as it was
        _SIM_MODULE.append(tensorrt)
    sim = _SIM_MODULE[0]
    sim._sim.reset()
    state = sim._sim.state()
    saved = {n: getattr(torch.cuda, n) for n in ("is_available", "get_device_name", "get_device_capability")}
    previous = sys.modules.get("tensorrt")
    sys.modules["tensorrt"] = sim
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_name = lambda device=None: state.gpu_name
    torch.cuda.get_device_capability = lambda device=None: tuple(state.compute_capability)
    try:
        yield sim
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        if previous is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = previous
        sim._sim.reset()


@pytest.fixture()
def trt_sim():
    """The TensorRT stand-in for one test (see `installed_trt_sim`); yields the `tensorrt` module."""
    with installed_trt_sim() as sim:
        yield sim


@pytest.fixture(scope="session")
def trt_sim_installer():
    """`installed_trt_sim` itself, for fixtures that install the stand-in only for some parameters."""
    return installed_trt_sim


@pytest.fixture(scope="module")
def trt_sim_module():
    """The TensorRT stand-in for a whole test module (module-scoped fixtures that build engines)."""
    with installed_trt_sim() as sim:
        yield sim
