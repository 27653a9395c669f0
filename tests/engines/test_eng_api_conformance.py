"""Every TensorRT and Polygraphy API the project calls exists in the oldest and newest supported TensorRT.

The TensorRT surfaces are the real bindings' (engines/api_surface.py imports each release's tensorrt.so against
stub libraries and lists every class and member). The calls are found statically, by walking the AST of the
TensorRT-facing modules:
- `trt.X` / `trt.X.Y` chains on the module object (`trt = require_tensorrt()`, `self._trt`, `import tensorrt`)
  are checked exactly: X in the module, Y among X's members;
- any other `obj.name` whose name is a TensorRT member in one release but in no class of the other release (what
  a removal looks like: `set_output_type`, `precision` on a layer) is flagged;
- Polygraphy keyword arguments are checked against the installed Polygraphy's signatures.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from k3trt.engines.api_surface import NEWEST, OLDEST, load_surface
from k3trt.runtime.tensorrt_env import supported_tensorrt

ROOT = Path(__file__).resolve().parents[2]
TENSORRT_MODULES = ("runtime/backends/trt.py", "runtime/tensorrt_env.py", "engines/build.py", "engines/refit.py",
                    "engines/selftest.py")
MODULE_NAMES = {"trt", "tensorrt", "_trt"}


def _chain(node: ast.AST) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def trt_uses(source: str) -> tuple[set[tuple[str, ...]], set[str]]:
    """(module chains like ('BuilderFlag', 'FP16'), other attribute names) used in `source`."""
    chains, names = set(), set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "ctx", None), ast.Del):
            continue
        parts = _chain(node)
        if len(parts) >= 2 and (parts[0] in MODULE_NAMES or parts[:2] == ["self", "_trt"]):
            rest = parts[2:] if parts[0] == "self" else parts[1:]
            if rest:
                chains.add(tuple(rest[:2]))
        else:
            names.add(node.attr)
    return chains, names


def project_names() -> set[str]:
    """Attribute names the project defines itself (dataclass fields, `self.x =`, methods): a use of those is
    ours, not TensorRT's, even where TensorRT has a member of that name (`plan.precision`)."""
    names = set()
    for path in list(ROOT.glob("*/*.py")) + list(ROOT.glob("runtime/backends/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


def problems(source: str, old: dict, new: dict, ours: frozenset = frozenset()) -> list[str]:
    chains, names = trt_uses(source)
    chains = {c for c in chains if not c[0].startswith("__")}  # __version__ comes from the package's __init__
    names -= ours
    found = []
    for surface in (old, new):
        for chain in sorted(chains):
            if chain[0] not in surface["module"]:
                found.append(f"tensorrt.{chain[0]} is not in TensorRT {surface['version']}")
            elif len(chain) == 2 and chain[1] not in surface["members"].get(chain[0], ()):
                found.append(f"tensorrt.{'.'.join(chain)} is not in TensorRT {surface['version']}")
    members = {v: set().union(*s["members"].values()) for v, s in ((old["version"], old), (new["version"], new))}
    for name in sorted(names):
        where = [v for v, m in members.items() if name in m]
        if len(where) == 1:
            missing = next(v for v in members if v not in where)
            found.append(f".{name} is a TensorRT {where[0]} member that TensorRT {missing} has nowhere")
    return found


@pytest.fixture(scope="module")
def surfaces():
    return load_surface(OLDEST), load_surface(NEWEST)


def test_the_checked_releases_are_the_ends_of_the_declared_range(surfaces):
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(supported_tensorrt())
    assert OLDEST.startswith("10.0") and "10.0.0" in spec and OLDEST in spec and NEWEST in spec
    assert "9.3.0" not in spec and "12.0.0" not in spec
    assert {s["version"] for s in surfaces} == {OLDEST, NEWEST}


@pytest.mark.parametrize("module", TENSORRT_MODULES)
def test_project_calls_exist_in_oldest_and_newest(module, surfaces):
    source = (ROOT / module).read_text()
    assert problems(source, *surfaces, frozenset(project_names())) == []


def test_the_check_catches_weak_typing_code(surfaces):
    """What this project called before strongly typed builds: each is reported against TensorRT 11."""
    weak = """
trt = require_tensorrt()
config.set_flag(trt.BuilderFlag.FP16)
config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
layer.precision = trt.float32
layer.set_output_type(0, trt.float32)
calibrator = trt.IInt8EntropyCalibrator2
"""
    found = problems(weak, *surfaces)
    assert f"tensorrt.BuilderFlag.FP16 is not in TensorRT {NEWEST}" in found
    assert f"tensorrt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS is not in TensorRT {NEWEST}" in found
    assert f"tensorrt.IInt8EntropyCalibrator2 is not in TensorRT {NEWEST}" in found
    assert any(p.startswith(".set_output_type is a TensorRT 10.0.1 member") for p in found), found
    assert all(str(OLDEST) not in p.split(" is not in TensorRT ")[-1] for p in found if "is not in" in p)


def test_surfaces_hold_what_strongly_typed_builds_need(surfaces):
    for surface in surfaces:
        members = surface["members"]
        assert "STRONGLY_TYPED" in members["NetworkDefinitionCreationFlag"]
        assert {"TF32", "REFIT"} <= set(members["BuilderFlag"])
        assert {"set_named_weights", "refit_cuda_engine", "get_all_weights"} <= set(members["Refitter"])
        assert "refit_from_file" in members["OnnxParserRefitter"]
    assert "FP16" in surfaces[0]["members"]["BuilderFlag"] and "FP16" not in surfaces[1]["members"]["BuilderFlag"]


def _keywords(source: str, function: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _chain(node.func)[-1:] == [function]:
            out |= {k.arg for k in node.keywords if k.arg}
    return out


def test_polygraphy_calls_match_the_installed_signatures():
    polygraphy = pytest.importorskip("polygraphy.backend.trt")
    source = "\n".join((ROOT / m).read_text() for m in TENSORRT_MODULES)
    for function in ("CreateConfig", "NetworkFromOnnxPath", "EngineBytesFromNetwork"):
        accepted = set().union(*(inspect.signature(c.__init__).parameters  # CreateConfig passes **kwargs up
                                 for c in getattr(polygraphy, function).__mro__ if "__init__" in vars(c)))
        used = _keywords(source, function)
        assert used <= accepted, (function, used - accepted)
    assert "fp16" not in _keywords(source, "CreateConfig") and "precision_constraints" not in \
        _keywords(source, "CreateConfig")
    assert {"min", "opt", "max"} <= set(inspect.signature(polygraphy.Profile.add).parameters)
