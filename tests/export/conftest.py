"""Fixtures shared by the export-stage tests (the session fixtures live in tests/conftest.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dir):
    from k3trt.export.sources import open_model_dir

    return open_model_dir(tiny_model_dir)


@pytest.fixture(scope="session")
def movq_changed_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny preset whose MoVQ differs in one tensor; everything else is byte-identical."""
    import torch
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("models") / "tiny-movq-changed"
    shutil.copytree(tiny_model_dir, dst)
    weights = dst / "movq" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = "decoder.conv_out.weight"
    assert key in tensors, sorted(tensors)[:20]
    tensors[key] = tensors[key] + 0.01 * torch.ones_like(tensors[key])
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst
