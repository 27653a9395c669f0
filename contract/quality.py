"""The manifest's "quality" section: what `k3trt qualify` measured for each reduced precision, end to end against
fp32 on held-out prompts, and how the runtime reads it (`--precision auto`, warnings for an explicit precision).

    "quality": {"bf16": {"psnr_db": 36.4, "psnr_db_mean": 38.0, "cosine": 0.9999, "backend": "openvino",
                         "reference_backend": "openvino", "speedup": 1.32, "total_ms": ..., "fp32_total_ms": ...,
                         "machine": "...", "threads": 2, "date": "2026-...Z", "prompts": 2, "steps": 10,
                         "resolution": "64x64", "onnx_keys": {"unet": "<export key>", ...}, ...}}

`psnr_db` and `cosine` are the worst over the prompts (the gate is on the worst image, not the average). A record
is current while every ONNX it was measured from is still the manifest's (same export keys); a re-export makes it
stale and the runtime ignores it until `k3trt qualify` runs again.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from k3trt.contract.errors import ArtifactError

DEFAULT_MIN_PSNR_DB = 30.0  # end-to-end image vs fp32, worst held-out prompt (issue 22: "30 dB by default")
QUALITY_KEY = "quality"
REQUIRED = {"psnr_db": float, "cosine": float, "backend": str, "machine": str, "date": str, "onnx_keys": dict}
TIMED = {"speedup": float, "total_ms": float, "fp32_total_ms": float}  # absent when it produced NaN/Inf


def check_quality_section(section: Any, where: str) -> None:
    """The manifest's quality section, if present, has the fields the runtime reads (a typed error otherwise)."""
    if not isinstance(section, dict):
        raise ArtifactError(f"{where}: manifest key 'quality' is a {type(section).__name__}", accepted="an object",
                            fix="re-run `k3trt qualify` (it rewrites the section)")
    for precision, record in section.items():
        if not isinstance(record, dict):
            raise ArtifactError(f"{where}: quality.{precision} is not an object", fix="re-run `k3trt qualify`")
        needed = REQUIRED if record.get("non_finite") else {**REQUIRED, **TIMED}
        for key, kind in needed.items():
            value = record.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                if kind is float else isinstance(value, kind)
            if not ok:
                raise ArtifactError(f"{where}: quality.{precision}.{key} is {value!r}", accepted=kind.__name__,
                                    fix="re-run `k3trt qualify` (it rewrites the section)")


def onnx_keys(manifest_data: Mapping, variants: Mapping[str, str]) -> dict:
    """"component.variant" -> export key of each ONNX a measurement ran from (what keeps its record current)."""
    onnx = manifest_data.get("onnx", {})
    return {f"{c}.{v}": onnx.get(c, {}).get(v, {}).get("export_key") for c, v in variants.items()}


def is_current(record: Mapping, manifest_data: Mapping) -> bool:
    onnx = manifest_data.get("onnx", {})
    for key_name, key in record.get("onnx_keys", {}).items():
        component, _, variant = key_name.partition(".")
        if key is None or onnx.get(component, {}).get(variant, {}).get("export_key") != key:
            return False
    return bool(record.get("onnx_keys"))


def current_records(manifest_data: Mapping) -> dict[str, dict]:
    """precision -> its record, for records still measured on the manifest's ONNX files."""
    section = manifest_data.get(QUALITY_KEY) or {}
    return {p: dict(r) for p, r in section.items() if isinstance(r, Mapping) and is_current(r, manifest_data)}


def meets_bound(record: Mapping, min_psnr: float) -> bool:
    """NaN/Inf anywhere end to end fails whatever the bound."""
    return not record.get("non_finite") and float(record["psnr_db"]) >= min_psnr


def describe(record: Mapping) -> str:
    if record.get("non_finite"):
        return "NaN/Inf end to end"
    return f"{record['psnr_db']:.1f} dB, {record['speedup']:.2f}x fp32's speed"
