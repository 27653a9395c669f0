"""The stand-in's impersonation machinery: which TensorRT release it is, and members gated by that release.

Every public name a stand-in class defines is looked up in the real bindings' surface of the impersonated
release (engines/api/tensorrt-<version>.json, read from the real tensorrt.so): a member that release lacks
raises AttributeError exactly as the real module does (TensorRT 11 on `BuilderFlag.FP16`, `layer.precision`,
`engine.device_memory_size`, ...). Names a user subclass defines (Polygraphy's logger, stream readers) are the
subclass's own and are not gated.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

SURFACES = Path(__file__).resolve().parents[3] / "engines" / "api"
OLDEST, NEWEST = "10.0.1", "11.4.0.106"  # the surfaces engines/api holds (k3trt.engines.api_surface)


class SimState:
    """What the simulated machine is. Tests change it through `tensorrt._sim`, never by hand."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.version = NEWEST  # the release impersonated: its surface gates every member
        self.driver_ok = True  # False: Builder/Runtime factories return nullptr, as with a too-old driver
        self.gpu_name = "NVIDIA A100-SXM4-80GB (TensorRT stand-in)"
        self.compute_capability = (8, 0)
        self.alignment = 256  # NvInferRuntime.h, IExecutionContext::setTensorAddress: ">= 256-byte alignment"
        self.host_memory_copies = 0  # bytes(IHostMemory) calls: a plan copied on the host
        self.capturing: dict[int, list] = {}  # stream handle -> launches recorded by a graph capture
        self.builds: list[dict] = []  # what each build_serialized_network saw (flags, profiles): for tests


STATE = SimState()


@functools.lru_cache(maxsize=None)
def surface(version: str) -> dict:
    data = json.loads((SURFACES / f"tensorrt-{version}.json").read_text())
    data["member_sets"] = {name: frozenset(members) for name, members in data["members"].items()}
    data["module_set"] = frozenset(data["module"])
    return data


def offered(trt_name: str, member: str, version: str | None = None) -> bool:
    return member in surface(version or STATE.version)["member_sets"].get(trt_name, ())


def module_offers(name: str) -> bool:
    return name in surface(STATE.version)["module_set"]


def _owner(cls: type, name: str) -> type | None:
    for klass in type.__getattribute__(cls, "__mro__"):
        if name in klass.__dict__:
            return klass
    return None


def _gate(cls: type, name: str, what: str) -> None:
    owner = _owner(cls, name)
    if owner is None or "_trt_name" not in owner.__dict__:
        return  # not a stand-in member: a subclass's own, or simply missing
    # the most derived stand-in class names the surface (a real subclass lists its inherited members too)
    trt_name = next(k.__dict__["_trt_name"] for k in type.__getattribute__(cls, "__mro__") if "_trt_name" in k.__dict__)
    if not offered(trt_name, name):
        raise AttributeError(f"{what} 'tensorrt.{trt_name}' has no attribute '{name}' "
                             f"(TensorRT {STATE.version})")


class ApiType(type):
    """Metaclass: class-level access (`trt.BuilderFlag.FP16`, `trt.ILayer.precision`) is gated too."""

    def __getattribute__(cls, name):
        if name[:1] != "_":
            _gate(cls, name, "type object")
        return type.__getattribute__(cls, name)


class Api(metaclass=ApiType):
    """Base of every stand-in class: instance members gated by the impersonated release."""

    _trt_name = "object"

    def __getattribute__(self, name):
        if name[:1] != "_":
            _gate(type(self), name, "object")
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if name[:1] != "_":
            _gate(type(self), name, "object")
        object.__setattr__(self, name, value)


# ------------------------------------------------------------------------------------------------ enums
class EnumType(ApiType):
    @property
    def __members__(cls):
        members = type.__getattribute__(cls, "_all_members")
        trt_name = type.__getattribute__(cls, "_trt_name")
        return {n: m for n, m in members.items() if offered(trt_name, n)}


class Enum(Api, metaclass=EnumType):
    """pybind11 enum semantics: members are instances with `.name` and `.value`, `int()` gives the value,
    equal by type and value, hashable; `Enum(value)` finds the member."""

    _trt_name = "Enum"
    _all_members: dict = {}

    def __new__(cls, value):
        for member in type.__getattribute__(cls, "_all_members").values():
            if member._value == int(value):
                return member
        raise ValueError(f"{value} is not a valid tensorrt.{cls._trt_name}")

    def __init__(self, value):
        pass

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> int:
        return self._value

    def __int__(self):
        return self._value

    __index__ = __int__

    def __eq__(self, other):
        return type(other) is type(self) and other._value == self._value

    def __hash__(self):
        return hash((self._trt_name, self._value))

    def __repr__(self):
        return f"<{self._trt_name}.{self._name}: {self._value}>"

    def __str__(self):
        return f"{self._trt_name}.{self._name}"


def make_enum(trt_name: str, names: list[str] | dict[str, int]) -> type:
    """An enum class whose members are `names` (or name -> value); each gated by the surfaces."""
    values = names if isinstance(names, dict) else {n: i for i, n in enumerate(names)}
    cls = EnumType(trt_name, (Enum,), {"_trt_name": trt_name, "__module__": "tensorrt"})
    members = {}
    for name, value in values.items():
        member = object.__new__(cls)
        object.__setattr__(member, "_name", name)
        object.__setattr__(member, "_value", value)
        members[name] = member
        type.__setattr__(cls, name, member)
    type.__setattr__(cls, "_all_members", members)
    return cls


def enum_names(trt_name: str) -> list[str]:
    """Members of enum `trt_name` in either surface (sorted), from the real bindings."""
    names = set()
    for version in (OLDEST, NEWEST):
        details = surface(version)["signatures"].get(trt_name, {})
        names |= {n for n, kind in details.items() if kind == "value" and n not in ("name", "value")}
    return sorted(names)


def surface_enums() -> list[str]:
    """Every class of either surface whose instances are enum members (it has `name` and `value`)."""
    def is_enum(details: dict) -> bool:
        return details.get("name") == "ro" and details.get("value") == "ro"

    names = set(surface(OLDEST)["signatures"]) | set(surface(NEWEST)["signatures"])
    # an enum in every release that has it (10.0's parser ErrorCode has a `name` method: not simulated)
    return sorted(n for n in names if enum_names(n) and all(
        is_enum(surface(v)["signatures"][n]) for v in (OLDEST, NEWEST) if n in surface(v)["signatures"]))
