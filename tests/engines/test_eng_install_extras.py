"""The GPU extras pick TensorRT's CUDA major, declare one supported range, and a Polygraphy that works with 11."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
POLYGRAPHY_FOR_TENSORRT_11 = Version("0.50.3")  # 0.49.0 sets EXPLICIT_BATCH, 0.49.26 reads precision_is_set


def requirements(extra: str) -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in EXTRAS[extra]}


def test_each_cuda_major_has_its_extra_with_one_supported_range():
    cu12, cu13 = requirements("gpu-cu12"), requirements("gpu-cu13")
    assert "tensorrt-cu12" in cu12 and "tensorrt" not in cu12 and "tensorrt-cu13" not in cu12
    assert "tensorrt-cu13" in cu13 and "tensorrt" not in cu13 and "tensorrt-cu12" not in cu13
    assert cu12["tensorrt-cu12"].specifier == cu13["tensorrt-cu13"].specifier
    assert EXTRAS["gpu"] == ["kandinsky3-trt[gpu-cu13]"]


def test_the_runtime_reads_the_range_the_extras_declare():
    from k3trt.runtime.tensorrt_env import supported_tensorrt

    assert supported_tensorrt() == str(requirements("gpu-cu13")["tensorrt-cu13"].specifier)


def test_polygraphy_floor_handles_tensorrt_11_everywhere_it_is_required():
    declared = {extra: reqs["polygraphy"] for extra in EXTRAS if "polygraphy" in (reqs := requirements(extra))}
    assert set(declared) >= {"export", "gpu-cu12", "gpu-cu13"}
    for extra, requirement in declared.items():
        assert "0.49.26" not in requirement.specifier and POLYGRAPHY_FOR_TENSORRT_11 in requirement.specifier, extra


def test_cuda_python_is_neither_declared_nor_imported():
    assert not any("cuda-python" in r for reqs in EXTRAS.values() for r in reqs)
    for path in ROOT.glob("**/*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "cuda" for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "cuda", path
