"""Shared fixtures: one tiny preset and one exported artifact directory per test session (~35 s on 2 cores)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


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
