"""The TensorRT stand-in offers only what the real bindings offer, with their argument lists.

Surfaces: engines/api/tensorrt-{10.0.1,11.4.0.106}.json, read from the real tensorrt.so of each release (module
names, class members, each member's kind, and the parameter names of every overload). Every class, method,
property and enum member the stand-in defines must exist in one of them, with the same kind and an argument list
of one real overload; impersonating a release, the stand-in offers exactly what that release has of it (members
removed in 11 raise). A planted member the real bindings lack fails the check.
"""
from __future__ import annotations

import inspect

import pytest

from k3trt.engines.api_surface import NEWEST, OLDEST, load_surface

pytestmark = [pytest.mark.trt_sim, pytest.mark.usefixtures("trt_sim")]
SURFACES = {v: load_surface(v) for v in (OLDEST, NEWEST)}


def stand_in_classes(trt) -> dict[str, type]:
    """Module-level classes of the stand-in, by name (the ones it defines, not Python's)."""
    return {name: getattr(trt, name) for name in dir(trt) if not name.startswith("_") and _is_stand_in(trt, name)}


def _is_stand_in(trt, name: str) -> bool:
    try:
        value = getattr(trt, name)
    except AttributeError:
        return False
    return isinstance(value, type) and "_trt_name" in value.__dict__


def own_members(cls: type) -> dict[str, object]:
    """Public members the stand-in class itself defines (its stand-in bases' included), plus __init__."""
    out = {}
    for klass in reversed(cls.__mro__):
        if "_trt_name" not in klass.__dict__:
            continue
        for name, value in klass.__dict__.items():
            if not name.startswith("_") or name == "__init__":
                out[name] = value
    return out


def _params(function) -> list[str]:
    params = list(inspect.signature(function).parameters.values())[1:]  # drop self
    return [p.name + ("=" if p.default is not inspect.Parameter.empty else "") for p in params]


def signature_problem(name: str, ours: list[str], overloads: list[list[str]]) -> str | None:
    """None if `ours` is one real overload's parameter list (names in order); a default we add must be one the
    real overload has, or leave a call that another real overload accepts (fewer arguments)."""
    bare = [p.rstrip("=") for p in ours]
    for real in overloads:
        if [p.rstrip("=") for p in real] != bare:
            continue
        shorter = {tuple(p.rstrip("=") for p in o) for o in overloads}
        if all(not p.endswith("=") or real[i].endswith("=") or tuple(bare[:i]) in shorter
               for i, p in enumerate(ours)):
            return None
    return f"{name}({', '.join(ours)}) matches no real overload {overloads}"


def member_problems(trt_name: str, member: str, value, details: dict) -> list[str]:
    where = [v for v, d in details.items() if member in d.get(trt_name, {})]
    if not where:
        return [f"tensorrt.{trt_name}.{member} is in no real release ({', '.join(details)})"]
    kinds = {v: details[v][trt_name][member] for v in where}
    if isinstance(value, property):
        wrong = [v for v, k in kinds.items() if k not in ("ro", "rw") or (value.fset and k == "ro")]
        return [f"tensorrt.{trt_name}.{member} is a{' writable' if value.fset else ''} property here, "
                f"{kinds[v]!r} in {v}" for v in wrong]
    if callable(value) and not isinstance(value, type):
        overloads = [o for k in kinds.values() if isinstance(k, list) for o in k]
        if not any(isinstance(k, list) for k in kinds.values()):
            return [f"tensorrt.{trt_name}.{member} is a method here, {kinds} in the real bindings"]
        if member == "__init__" and not overloads:
            return []  # not constructible from Python in the real bindings: ours is internal
        problem = signature_problem(f"tensorrt.{trt_name}.{member}", _params(value), overloads)
        return [problem] if problem else []
    if any(k not in ("value", "class", "ro") for k in kinds.values()):  # "ro": a static read-only property
        return [f"tensorrt.{trt_name}.{member} is a value here, {kinds} in the real bindings"]
    return []


def stand_in_problems(trt) -> list[str]:
    details = {v: s["signatures"] for v, s in SURFACES.items()}
    found = []
    for name, cls in sorted(stand_in_classes(trt).items()):
        if cls._trt_name != name or not any(name in s["module"] for s in SURFACES.values()):
            found.append(f"class tensorrt.{name} ({cls._trt_name}) is in no real release")
            continue
        for member, value in own_members(cls).items():
            found += member_problems(name, member, value, details)
    for function in ("init_libnvinfer_plugins", "get_nv_onnx_parser_version"):
        real = [o for s in SURFACES.values() for o in s["functions"].get(function, [])]
        ours = [p.name for p in inspect.signature(getattr(trt, function)).parameters.values()]
        problem = signature_problem(function, ours, real)
        found += [problem] if problem else []
    return found


def test_the_stand_in_is_a_subset_of_the_real_bindings(trt_sim):
    assert stand_in_problems(trt_sim) == []
    assert len(stand_in_classes(trt_sim)) > 30  # the check saw the stand-in, not an empty module


@pytest.mark.parametrize("planted, expected", [
    ("run_on_cpu", "tensorrt.ICudaEngine.run_on_cpu is in no real release"),
    ("set_input_shape", "tensorrt.ICudaEngine.set_input_shape is in no real release"),
])
def test_a_planted_member_fails_the_check(trt_sim, monkeypatch, planted, expected):
    monkeypatch.setattr(trt_sim.ICudaEngine, planted, lambda self, name: True, raising=False)
    assert any(p.startswith(expected) for p in stand_in_problems(trt_sim))


def test_a_planted_argument_list_fails_the_check(trt_sim, monkeypatch):
    monkeypatch.setattr(trt_sim.IExecutionContext, "set_input_shape", lambda self, tensor, dims: True)
    assert any(p.startswith("tensorrt.IExecutionContext.set_input_shape(tensor, dims) matches no real overload")
               for p in stand_in_problems(trt_sim))


def test_a_planted_writable_property_fails_the_check(trt_sim, monkeypatch):
    monkeypatch.setattr(trt_sim.ICudaEngine, "num_io_tensors", property(lambda self: 0, lambda self, v: None))
    assert "tensorrt.ICudaEngine.num_io_tensors is a writable property here, 'ro' in 10.0.1" in \
        stand_in_problems(trt_sim)


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_impersonating_a_release_offers_exactly_its_members(trt_sim, version):
    trt_sim._sim.impersonate(version)
    members = SURFACES[version]["members"]
    assert trt_sim.__version__ == version
    for name, cls in stand_in_classes(trt_sim).items():
        for member in own_members(cls):
            if member.startswith("_"):
                continue
            offered = member in members.get(name, ())
            assert hasattr(cls, member) == offered, (version, name, member)


def test_tensorrt_11_raises_on_what_it_removed(trt_sim):
    trt_sim._sim.impersonate(OLDEST)
    assert trt_sim.BuilderFlag.FP16 and trt_sim.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    assert "FP16" in trt_sim.BuilderFlag.__members__
    trt_sim._sim.impersonate(NEWEST)
    for owner, member in (("BuilderFlag", "FP16"), ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"),
                          ("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"), ("ILayer", "precision"),
                          ("ICudaEngine", "device_memory_size"), ("IBuilderConfig", "int8_calibrator"),
                          ("Builder", "platform_has_fast_fp16")):
        with pytest.raises(AttributeError, match=member):
            getattr(getattr(trt_sim, owner), member)
    assert "FP16" not in trt_sim.BuilderFlag.__members__
    with pytest.raises(AttributeError, match="IInt8EntropyCalibrator2"):
        trt_sim.IInt8EntropyCalibrator2  # noqa: B018
