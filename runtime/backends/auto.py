"""`--backend auto` and `--precision auto`: which backend and precision a request runs in when the user leaves the
choice to us, by a documented rule, and the warnings a reduced precision's recorded quality or speed call for.

The backend rule (no probe: compiling every component twice to time it costs more than it tells). Both CPU
backends run the same fp32 ONNX and are fp32-exact (parity >= 96 dB against diffusers on the small preset), so
the fastest installed one is picked:

1. a GPU provider (`provider="cuda"` / `"tensorrt"`) is ONNX Runtime's: ort;
2. a precision only ONNX Runtime runs (the fp16 ONNX variants), or bf16 on a CPU without native bf16 (ONNX
   Runtime emulates its storage; OpenVINO refuses), or an ONNX Runtime-only option: ort;
3. OpenVINO installed: openvino. Measured on the small preset, 2 cores, one interleaved `k3trt bench` run per size
   (docs/performance.md): OpenVINO fp32 took 0.96x ONNX Runtime fp32's time at 256x256 and 1.02x at 512x512 (within
   that run's spread), and it compiles static shapes that its disk cache keeps between processes. int8 goes here
   too: OpenVINO runs the Q/DQ U-Net with integer kernels, ONNX Runtime's CPU kernels ran it slower than fp32;
4. otherwise ort, with what is missing for OpenVINO in the choice's reason.

The precision rule (`--precision auto`): the fastest precision whose end-to-end quality recorded by
`k3trt qualify` in the manifest meets the bound (30 dB PSNR against fp32 by default), among those this machine
and the installed backends can run; fp32 when none is faster and good enough, or when nothing was recorded.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Mapping

from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.precision import Precision, requested_precision
from k3trt.contract.quality import DEFAULT_MIN_PSNR_DB, current_records, describe, meets_bound
from k3trt.runtime.cpuinfo import cpu_info

log = logging.getLogger("k3trt")

AUTO = "auto"
OPENVINO_PRECISIONS = (Precision.FP32, Precision.BF16, Precision.INT8)  # int8: the Q/DQ U-Net's own graph
OPENVINO_OPTIONS = ("threads", "cache_dir", "verify")  # keyword options both an auto choice can pass on


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What `auto` chose and why (printed by `k3trt bench`, kept on the backend as `auto_choice`)."""

    backend: str
    precision: str | None  # the precision auto chose (`--precision auto`), else None: what was asked
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_backend(precision: "str | Precision | Mapping | None", options: Mapping | None = None, *,
                   has_openvino: bool | None = None) -> AutoChoice:
    """The backend rule above, for a request's precision (one, or a per-component map) and backend options."""
    options = dict(options or {})
    has_openvino = openvino_installed() if has_openvino is None else has_openvino
    provider = options.get("provider", "cpu")
    if provider != "cpu":
        return AutoChoice("ort", None, f"provider {provider!r} is an ONNX Runtime execution provider")
    asked = _asked(precision)
    only_ort = [str(p) for p in asked if p not in OPENVINO_PRECISIONS]
    if only_ort:
        return AutoChoice("ort", None, f"{', '.join(sorted(set(only_ort)))} runs from its own ONNX variant, which "
                                       "only ONNX Runtime reads")
    if Precision.BF16 in asked and not cpu_info().bf16:
        return AutoChoice("ort", None, f"bf16 without native bf16 arithmetic ({cpu_info().describe()}): ONNX "
                                       "Runtime emulates its storage, OpenVINO refuses")
    extra = sorted(set(options) - {"provider", *OPENVINO_OPTIONS})
    if extra:
        return AutoChoice("ort", None, f"option(s) {', '.join(extra)} are ONNX Runtime's")
    if has_openvino:
        return AutoChoice("openvino", None, "OpenVINO is installed: the faster fp32-exact CPU backend "
                                            "(docs/performance.md)")
    return AutoChoice("ort", None, "OpenVINO is not installed (no wheel for this platform, or installed without "
                                   "it): ONNX Runtime; `pip install openvino` makes auto pick it")


def _asked(precision) -> set:
    if isinstance(precision, Mapping):
        return {p for p in (requested_precision(v) for v in precision.values()) if p is not None}
    asked = requested_precision(precision)
    return set() if asked is None else {asked}


def backend_options(choice: AutoChoice, options: Mapping) -> dict:
    """The options the chosen backend takes (OpenVINO has no provider: auto picks it only for "cpu")."""
    return {k: v for k, v in options.items() if choice.backend == "ort" or k in OPENVINO_OPTIONS}


# ----------------------------------------------------------------------------------------- --precision auto
def runnable(precision: str, record: Mapping, manifest_data: Mapping, *, has_openvino: bool) -> bool:
    """Whether this machine and install can run `precision` the way `k3trt qualify` measured it."""
    backend = record.get("backend")
    if backend == "openvino":
        has_variant = precision != "int8" or "int8" in manifest_data.get("onnx", {}).get("unet", {})
        return has_openvino and has_variant and (precision != "bf16" or cpu_info().bf16)
    return backend == "ort" and precision in manifest_data.get("onnx", {}).get("unet", {})


def choose_precision_auto(manifest_data: Mapping, *, min_psnr: float = DEFAULT_MIN_PSNR_DB,
                          has_openvino: bool | None = None) -> tuple[str, str | None, str]:
    """(precision, the backend it was measured on or None, reason): the fastest recorded precision whose quality
    meets `min_psnr` and which runs here; fp32 otherwise."""
    has_openvino = openvino_installed() if has_openvino is None else has_openvino
    records = current_records(manifest_data)
    if not records:
        return "fp32", None, "no reduced precision is recorded in the manifest (run `k3trt qualify`): fp32"
    good = {p: r for p, r in records.items() if meets_bound(r, min_psnr) and r["speedup"] > 1.0
            and runnable(p, r, manifest_data, has_openvino=has_openvino)}
    if not good:
        seen = ", ".join(f"{p} {describe(r)}" for p, r in sorted(records.items()))
        return "fp32", None, f"no recorded precision is faster and >= {min_psnr:g} dB here ({seen}): fp32"
    best = max(good, key=lambda p: good[p]["speedup"])
    r = good[best]
    return best, r["backend"], (f"{best}: {r['psnr_db']:.1f} dB >= {min_psnr:g} dB and {r['speedup']:.2f}x fp32's "
                                f"speed, measured by `k3trt qualify` on {r['machine']} ({r['date']})")


def check_min_psnr(min_psnr) -> float:
    if isinstance(min_psnr, bool) or not isinstance(min_psnr, (int, float)) or not 0 < float(min_psnr) < 200:
        raise InvalidArgumentError(f"min_psnr={min_psnr!r}", accepted="a PSNR bound in dB, 0 < x < 200",
                                   fix=f"e.g. --min-psnr {DEFAULT_MIN_PSNR_DB:g} (the default)")
    return float(min_psnr)


def warn_from_records(manifest_data: Mapping, resolved: Mapping[str, str], backend: str, provider: str = "cpu", *,
                      min_psnr: float = DEFAULT_MIN_PSNR_DB) -> list[str]:
    """Warnings for an explicit reduced precision: below its recorded quality bound, or measured slower than fp32
    on this CPU backend. Returns (and logs) them."""
    records = current_records(manifest_data)
    warnings = []
    for precision in sorted(set(resolved.values()) - {"fp32", "tf32"}):
        record = records.get(precision)
        if record is None:
            continue
        if record.get("non_finite"):
            warnings.append(f"{precision} produced NaN/Inf end to end when `k3trt qualify` measured it "
                            f"({record['non_finite']}; {record['machine']}, {record['date']})")
            continue
        if not meets_bound(record, min_psnr):
            warnings.append(f"{precision} measured {record['psnr_db']:.1f} dB PSNR against fp32 end to end, below "
                            f"the {min_psnr:g} dB bound (`k3trt qualify`, {record['machine']}, {record['date']})")
        if record["speedup"] < 1.0 and record["backend"] == backend and provider == "cpu":
            warnings.append(f"{precision} on {backend} measured {1 / record['speedup']:.2f}x slower than fp32 "
                            f"({record['total_ms']:.0f} vs {record['fp32_total_ms']:.0f} ms per image, "
                            f"{record['machine']}, {record['date']}): --precision fp32 is faster here")
    for warning in warnings:
        log.warning(warning)
    return warnings
