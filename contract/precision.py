"""Precision as an enum: one vocabulary for export variants, engines and the runtime; and its one resolution.

Two meanings meet here: the ONNX variant a component runs from and the precision it computes in. With
strongly typed engines they coincide (TF32 aside), and `resolve_precision` is the single place that turns a
request into both, from the card and the manifest: the CLI, every backend, parity and engine selection use it.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Mapping

from k3trt.contract.cards import card
from k3trt.contract.errors import ArtifactError, InvalidArgumentError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidArgumentError(
                f"unknown precision {value!r}",
                accepted=", ".join(p.value for p in cls),
                fix="pass one of the accepted names, e.g. --precision fp16",
            ) from None

    def __str__(self) -> str:  # argparse/f-strings print the plain name
        return self.value


# ----------------------------------------------------------------------------------------- resolution
QUANTIZED = (Precision.INT8, Precision.FP8)  # from an explicit Q/DQ variant (`k3trt calibrate`)


def variant_of(precision: Precision) -> str:
    """The ONNX variant a precision runs from: a strongly typed engine computes in its ONNX's types, so the
    variant *is* the compute precision, except TF32 (the fp32 graph with TF32 math allowed)."""
    return "fp32" if precision in (Precision.FP32, Precision.TF32) else precision.value


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What one component runs in, resolved once from the request, the card and the manifest."""

    component: str
    precision: Precision  # compute precision (parity tolerances, engine selection)
    variant: str  # the manifest's ONNX variant key (onnx.<component>.<variant>)
    requested: str  # what was asked, for messages

    def to_dict(self) -> dict:
        return {"precision": self.precision.value, "variant": self.variant, "requested": self.requested}


def _fix_for(component: str, precision: Precision, artifacts: str) -> str:
    if precision in QUANTIZED:
        if precision is Precision.INT8:
            return f"run `k3trt calibrate --artifacts {artifacts} --component {component}`"
        return "export an fp8 Q/DQ variant first"
    return f"run `k3trt export ... --components {component} --precision {precision} --out {artifacts}`"


def choose_precision(component: str, requested: "str | Precision | None", *, baseline: str = "fp32",
                     explicit: bool = False) -> Precision:
    """What `component` computes in, from the request and its card alone (no manifest).

    `requested` None / "default" means `baseline`: "fp32" for ONNX Runtime, "default" (the card's default) for
    TensorRT. A precision the card does not allow (int8 for the text encoder) falls back to `baseline` when it
    came from one global --precision, and is a typed error when it was asked for this component (`explicit`)."""

    policy = card(component).precision
    asked = requested_precision(requested)
    if asked is None:
        asked = Precision.parse(policy.default if baseline == "default" else baseline)
    allowed = set(policy.variants) | {"tf32"}
    if asked.value in allowed:
        return asked
    if explicit:
        raise InvalidArgumentError(f"{component}={asked} is not a precision {component} can run in",
                                   accepted=", ".join(sorted(allowed)),
                                   fix=f"drop the {component} override, or pick an accepted precision")
    return choose_precision(component, None, baseline=baseline)


def requested_precision(value: "str | Precision | None") -> "Precision | None":
    """A user's --precision word parsed once: None for "use the backend's baseline" (None, "default", "auto")."""
    return None if value in (None, "default", "auto") else Precision.parse(value)


def resolve_precision(onnx_index: Mapping[str, Mapping], component: str, requested: "str | Precision | None", *,
                      baseline: str = "fp32", explicit: bool = False, artifacts: str = "ART",
                      variant_for: "Callable[[Precision], str]" = variant_of) -> Resolved:
    """The one resolution of "precision" for `component`: `choose_precision`, then the manifest (its "onnx"
    section is `onnx_index`) must hold a current variant for it, else a typed error with the fix (a variant
    derived from an earlier fp32 export is stale). `variant_for` is the backend's hook for which ONNX a
    precision runs from: the variant of that precision for strongly typed runtimes (the default), always fp32
    for OpenVINO, where the precision is a compile setting."""

    precision = choose_precision(component, requested, baseline=baseline, explicit=explicit)
    variant = variant_for(precision)
    variants = onnx_index.get(component, {})
    if variant not in variants:
        raise ArtifactError(f"{component} has no {variant} ONNX variant (asked: {requested or 'default'})",
                            accepted=", ".join(variants) or "(not exported)",
                            fix=_fix_for(component, precision, artifacts))
    derived = variants[variant].get("extra", {}).get("fp32_export_key")
    if derived and "fp32" in variants and derived != variants["fp32"].get("export_key"):
        raise ArtifactError(f"the {variant} {component} was derived from an earlier fp32 export (stale)",
                            fix=_fix_for(component, precision, artifacts))
    return Resolved(component, precision, variant, str(requested or "default"))
