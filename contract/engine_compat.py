"""Engine compatibility, engine selection and feed-vs-profile checks: pure functions over manifest entries.

A serialized TensorRT engine runs only under the TensorRT version that built it and on GPUs of the compute
capability it was built for (we build neither version- nor hardware-compatible engines: both cost speed).
These decisions live here, free of TensorRT, so the CPU test suite covers them with fake manifest entries.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Mapping, Sequence

from k3trt.contract.errors import ArtifactError, EngineCompatibilityError, ShapeError
from k3trt.contract.precision import Precision

# Minimum compute capability per precision. FP8 tensor cores exist from Ada (8.9) and Hopper (9.0) on; bf16
# and tf32 from Ampere (8.0). Source: TensorRT support matrix, "GPU Architecture and Precision Support".
MIN_COMPUTE_CAPABILITY = {Precision.FP8: (8, 9), Precision.BF16: (8, 0), Precision.TF32: (8, 0)}


@dataclasses.dataclass(frozen=True)
class DeviceEnv:
    """What decides whether an engine can run here."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]

    def to_dict(self) -> dict:
        return {"tensorrt": self.trt_version, "gpu": {"name": self.gpu_name,
                                                      "compute_capability": list(self.compute_capability)}}


def cc_text(cc: Sequence[int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def check_precision_supported(precision: str | Precision, cc: Sequence[int], gpu_name: str = "this GPU") -> None:
    precision = Precision.parse(precision)
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need and tuple(cc) < need:
        raise EngineCompatibilityError(
            f"{precision} engines need compute capability >= {cc_text(need)}; {gpu_name} has {cc_text(cc)}",
            accepted=f"{precision} on GPUs with compute capability {cc_text(need)} or newer"
                     + (" (Ada Lovelace 8.9, Hopper 9.0 and later)" if precision is Precision.FP8 else
                        " (Ampere and later)"),
            fix="pick another precision, e.g. --precision fp16")


def rebuild_command(artifacts: str, entry: Mapping) -> str:
    """The `k3trt build` command that rebuilds `entry` for this machine, with the same request."""
    request = entry.get("request", {})
    parts = ["k3trt", "build", "--artifacts", str(artifacts), "--components", entry["component"],
             "--component-precision", f"{entry['component']}={entry['precision']}"]
    if request.get("resolutions"):
        parts += ["--resolution", *request["resolutions"]]
    if request.get("batch"):
        lo, hi = request["batch"]
        parts += ["--batch", f"{lo}" if lo == hi else f"{lo}-{hi}"]
    if request.get("guidance") is False:
        parts.append("--no-guidance")
    if entry.get("flags", {}).get("refittable"):
        parts.append("--refittable")
    return " ".join(shlex.quote(p) for p in parts)


def check_engine_compatible(name: str, entry: Mapping, env: DeviceEnv, *, onnx_sha256: str | None,
                            artifacts: str) -> list[str]:
    """Raise EngineCompatibilityError if the engine cannot run here; return warnings for what can."""
    rebuild = rebuild_command(artifacts, entry)
    built_trt = str(entry.get("tensorrt", "unknown"))
    if built_trt != env.trt_version:
        raise EngineCompatibilityError(
            f"engine {name!r} was built by TensorRT {built_trt}; this machine has TensorRT {env.trt_version}",
            accepted="the exact TensorRT version that built the engine", fix=f"rebuild it here: {rebuild}")
    gpu = entry.get("gpu", {})
    built_cc = tuple(gpu.get("compute_capability", ()))
    if built_cc != tuple(env.compute_capability):
        raise EngineCompatibilityError(
            f"engine {name!r} was built for compute capability {cc_text(built_cc) if built_cc else '?'} "
            f"({gpu.get('name', 'unknown GPU')}); this GPU ({env.gpu_name}) is {cc_text(env.compute_capability)}",
            accepted="the compute capability the engine was built for", fix=f"rebuild it here: {rebuild}")
    if onnx_sha256 is not None and entry.get("onnx_sha256") != onnx_sha256:
        raise EngineCompatibilityError(
            f"engine {name!r} was built from ONNX sha256 {str(entry.get('onnx_sha256'))[:12]}…, but the "
            f"manifest's ONNX is now {onnx_sha256[:12]}… (re-exported since)",
            accepted="an engine built from the current ONNX", fix=f"rebuild it: {rebuild}")
    warnings = []
    if gpu.get("name") and gpu["name"] != env.gpu_name:
        warnings.append(f"engine {name!r} was tuned on {gpu['name']}; running on {env.gpu_name} (same compute "
                        f"capability, so it runs, but tactics may be slower): {rebuild}")
    return warnings


def select_engine(engines: Mapping[str, Mapping], component: str, wanted: str | Precision,
                  artifacts: str = "ART") -> tuple[str, Mapping]:
    """The engine entry for `component` at `wanted` precision: an engine of that precision, else one from a
    build run whose --precision was `wanted` (e.g. the bf16 text encoder of an `--precision int8` build)."""
    wanted = Precision.parse(wanted).value
    mine = {n: e for n, e in engines.items() if e.get("component") == component}
    for key in ("precision", "build_precision"):
        hits = sorted(((n, e) for n, e in mine.items() if e.get(key) == wanted),
                      key=lambda item: str(item[1].get("built_at", "")))
        if hits:
            return hits[-1]
    have = ", ".join(f"{n} ({e.get('precision')})" for n, e in sorted(mine.items())) or "none"
    raise ArtifactError(f"no {wanted} TensorRT engine for {component} in {artifacts}",
                        accepted=f"engines built for {component}: {have}",
                        fix=f"k3trt build --artifacts {artifacts} --components {component} "
                            f"--component-precision {component}={wanted}")


def check_feeds_in_profile(engine: str, profile: Mapping[str, Sequence[Sequence[int]]],
                           shapes: Mapping[str, Sequence[int]]) -> None:
    """Every feed's shape inside the engine's min..max profile, dimension by dimension.

    `profile` maps input name -> (min, opt, max) shapes, as `ICudaEngine.get_tensor_profile_shape` returns."""
    missing = sorted(set(profile) - set(shapes))
    if missing:
        raise ShapeError(f"engine {engine!r} needs input(s) {missing}", accepted=str(sorted(profile)))
    for name, (lo, opt, hi) in profile.items():
        shape = tuple(int(d) for d in shapes[name])
        lo, opt, hi = (tuple(int(d) for d in s) for s in (lo, opt, hi))
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            span = "static " + str(lo) if lo == hi else f"{lo} .. {hi} (opt {opt})"
            raise ShapeError(
                f"{name} shape {shape} is outside the optimization profile of engine {engine!r}",
                accepted=span,
                fix="rebuild the engine for this shape (k3trt build --resolution WxH --batch N ...) or change "
                    "the request to fit the profile")
