"""Which ONNX variant each engine is built from: strongly typed builds, precision lives in the ONNX.

TensorRT 11 builds every network strongly typed (each layer runs in the type of its ONNX tensors) and removed the
FP16/BF16/INT8 builder flags, precision constraints and per-layer precision setters; on TensorRT 10 the
STRONGLY_TYPED network flag does the same. So an engine's precision is the precision of the variant it is parsed
from: fp16/bf16 variants (with their fp32 islands, export/variants.py) or the int8 Q/DQ variant (calibration).
TF32 is the one math mode left as a builder flag: allowed for every build but strict fp32 (the tf32 precision is
the fp32 variant with it; fp16/bf16/int8 builds use it for their fp32 islands).

The resolution itself (request -> compute precision + variant, from the card and the manifest) is
`k3trt.contract.precision.choose_precision` / `resolve_precision`, shared with the runtime's backends.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from k3trt.contract.cards import COMPONENTS, card
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.precision import QUANTIZED, Precision, choose_precision, variant_of  # noqa: F401

DEFAULT_PRECISION = {name: Precision.parse(card(name).precision.default) for name in COMPONENTS}


@dataclasses.dataclass(frozen=True)
class ComponentPrecision:
    component: str
    precision: Precision  # what the engine computes in
    variant: str  # the ONNX variant it is parsed from (onnx.<component>.<variant>)
    tf32: bool  # TF32 math for the fp32 parts, islands included (a builder flag on TensorRT 10 and 11)
    fp32_policy: str  # the card's fp32-island policy baked into the variant ("none" for fp32/int8)

    @property
    def converted(self) -> bool:
        """Made from the fp32 export by the converter (fp16/bf16), not by calibration."""
        return self.variant in card(self.component).precision.converted

    def to_dict(self) -> dict:
        return {"precision": self.precision.value, "variant": self.variant, "tf32": self.tf32,
                "strongly_typed": True, "fp32_policy": self.fp32_policy}


def allows_tf32(precision: Precision) -> bool:
    """TF32 for the fp32 parts of an engine: everything but a strict fp32 build. The fp32 islands of fp16/bf16
    variants (norms, the T5 `wo` projections) and the unquantized layers of Q/DQ graphs then run on tensor cores,
    as TensorRT does by default (NvInfer.h, BuilderFlag::kTF32: "Enabled by default"); Polygraphy clears the flag
    unless asked (`CreateConfig(tf32=False)` is its default), so the plan asks."""
    return precision is not Precision.FP32


def parse_component_precision(text: str | None) -> dict[str, Precision]:
    """'text_encoder=bf16,unet=fp16' -> {component: Precision}."""
    out: dict[str, Precision] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise InvalidArgumentError(f"--component-precision item {item!r} is not COMPONENT=PRECISION",
                                       accepted="e.g. text_encoder=bf16,unet=fp16,movq_decoder=fp16",
                                       fix="separate items with commas and name each component once")
        if name not in COMPONENTS:
            raise InvalidArgumentError(f"unknown component {name!r} in --component-precision",
                                       accepted=", ".join(COMPONENTS), fix="e.g. unet=fp16")
        if name in out:
            raise InvalidArgumentError(f"component {name!r} appears twice in --component-precision",
                                       fix="name each component once")
        out[name] = Precision.parse(value)
    return out


def select_precisions(components: Iterable[str], precision: str | Precision | None = None,
                      overrides: Mapping[str, Precision] | None = None) -> dict[str, ComponentPrecision]:
    """Per component: override > global --precision > the card's default (a global precision a component
    cannot have, e.g. int8 for the text encoder, falls back to its default). The manifest is checked by the
    plan, which also creates missing converted variants."""
    overrides = dict(overrides or {})
    out = {}
    for name in components:
        explicit = name in overrides
        chosen = choose_precision(name, overrides[name] if explicit else precision, baseline="default",
                                  explicit=explicit)
        variant = variant_of(chosen)
        out[name] = ComponentPrecision(name, chosen, variant, allows_tf32(chosen),
                                       card(name).precision.islands(variant))
    return out
