"""Plain helpers for the export-stage tests (fixtures are in conftest.py). Imported as a top-level module:
pytest puts this folder on sys.path (rootdir-relative "prepend" import mode, no __init__.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

WEIGHT_FOLDERS = ("text_encoder", "unet", "movq")


def quiet(*_args) -> None:
    """A `log` callable for export_artifacts that prints nothing."""


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root` (hidden ones too) -> (sha256, mtime_ns)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                path.stat().st_mtime_ns)
    return out


def copy_model_without_weights(src: Path, dst: Path) -> Path:
    """A copy of a diffusers folder with configs and tokenizer but no *.safetensors files (cheap to make)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def impossible_fp32_bound(monkeypatch, owner, name: str) -> None:
    """Make `owner.name` (a validation function taking the component spec first) fail for real: the genuine
    comparison against torch, with an fp32 bound no export can meet."""
    from k3trt.contract.cards import Tolerance

    real = getattr(owner, name)

    def strict(spec, *args, **kwargs):
        parity = {**spec.card.parity, "fp32": Tolerance(1e-12, 1.0)}
        return real(dataclasses.replace(spec, card=dataclasses.replace(spec.card, parity=parity)), *args, **kwargs)

    monkeypatch.setattr(owner, name, strict)
