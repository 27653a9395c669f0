"""Optimization profiles: from what the user asks (image sizes, images per call) to per-input min/opt/max shapes.

Pure functions, no TensorRT. Every derived range is checked against the manifest's axis ranges (and required
multiples), so a request the exported ONNX cannot serve fails here, naming the value and the accepted range,
instead of deep inside a 40-minute engine build.

How each axis is derived is the card's business (k3trt.contract.cards): every dynamic input axis has a role,
and this module turns roles into ranges once for every component:
- latent: latent_side(pixels) of each requested resolution (diffusers' 64-px rounding, MoVQ's 8x factor);
  pixel: the rounded image side itself.
- batch: images per call through the card's batch rule (x2 for the guided U-Net; 1x..2x for the text encoder,
  which may encode prompt and negative prompt in one call; 1x for the MoVQ decoder).
- context (U-Net): 1..128 always: L is cut to the longest prompt's token count + 1, so it depends on the
  prompt, not on the request; padding it to a fixed 128 would change the attention pooling's mean.
  Opt 77: TensorRT tunes tactics at opt; typical prompts trim to tens of tokens, and 77 (the CLIP-era prompt
  budget many prompts are written for) sits mid-range, so neither short nor long prompts land at an extreme.
- sequence (text encoder): the tokenizer's max length (128), fixed: the pipeline always pads to it, so a
  static sequence axis loses nothing and lets TensorRT specialise the attention.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

from k3trt.contract.cards import MAX_TEXT_LENGTH as MAX_CONTEXT
from k3trt.contract.cards import OPT_CONTEXT, AxisRole, card, latent_side, round_pixels
from k3trt.contract.errors import ArtifactError, InvalidArgumentError, ShapeError
from k3trt.contract.manifest import OnnxRecord

DEFAULT_RESOLUTION = "1024x1024"


# ----------------------------------------------------------------------------------------- requests
@dataclasses.dataclass(frozen=True)
class ProfileRequest:
    """What the engines must serve. Resolutions are (height, width) in pixels."""

    resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)
    batch: tuple[int, int] = (1, 1)  # images per pipeline call, inclusive
    static: bool = False  # assert one shape; refuse ranges
    guidance: bool = True  # classifier-free guidance doubles the U-Net batch
    max_text_length: int = MAX_CONTEXT
    opt_context: int = OPT_CONTEXT

    def to_dict(self) -> dict:
        return {"resolutions": [f"{w}x{h}" for h, w in self.resolutions], "batch": list(self.batch),
                "static": self.static, "guidance": self.guidance, "max_text_length": self.max_text_length,
                "opt_context": self.opt_context}


def parse_resolution(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' in pixels (as image sizes are usually written) -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise InvalidArgumentError(f"resolution {text!r} is not WIDTHxHEIGHT in pixels",
                                   accepted="e.g. 1024x1024 or 1280x768 (width x height, positive integers)",
                                   fix="pass --resolution 1024x1024")
    return int(match[2]), int(match[1])


def parse_batch(text: str | int) -> tuple[int, int]:
    """'N' or 'MIN-MAX' images per call -> (min, max)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if match:
        lo, hi = int(match[1]), int(match[2] or match[1])
        if 1 <= lo <= hi:
            return lo, hi
    raise InvalidArgumentError(f"batch {text!r} is not N or MIN-MAX images per call",
                               accepted="1 <= MIN <= MAX, e.g. 1 or 1-4", fix="pass --batch 1-4")


def make_request(resolutions: Iterable[str] | None = None, batch: str | int = 1, *, static: bool = False,
                 guidance: bool = True, max_text_length: int = MAX_CONTEXT) -> ProfileRequest:
    sizes = tuple(dict.fromkeys(parse_resolution(r) for r in (resolutions or [DEFAULT_RESOLUTION])))
    lo, hi = parse_batch(batch)
    if static and (len(sizes) > 1 or lo != hi):
        raise InvalidArgumentError(
            f"--static with {len(sizes)} resolution(s) and batch {lo}-{hi}",
            accepted="--static needs exactly one --resolution and one --batch value",
            fix="drop --static to build a dynamic profile over the range, or ask for one shape")
    return ProfileRequest(sizes, (lo, hi), static, guidance, max_text_length,
                          min(OPT_CONTEXT, max_text_length))


def latent_size(pixels: int) -> int:
    return latent_side(pixels)


# ----------------------------------------------------------------------------------------- profiles
@dataclasses.dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int
    why: str = ""  # where the numbers came from, for error messages and the plan

    @property
    def static(self) -> bool:
        return self.min == self.max


@dataclasses.dataclass(frozen=True)
class InputProfile:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclasses.dataclass(frozen=True)
class ComponentProfile:
    component: str
    axes: tuple[tuple[str, AxisRange], ...]
    inputs: tuple[InputProfile, ...]

    @property
    def static(self) -> bool:
        return all(r.static for _, r in self.axes)

    def axis(self, name: str) -> AxisRange:
        return dict(self.axes)[name]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        return {i.name: (i.min, i.opt, i.max) for i in self.inputs}

    def to_dict(self) -> dict:
        return {"static": self.static,
                "axes": {n: {"min": r.min, "opt": r.opt, "max": r.max, "from": r.why} for n, r in self.axes},
                "inputs": {i.name: i.to_dict() for i in self.inputs}}


def _span(values: Iterable[int], opt: int, why: str) -> AxisRange:
    values = list(values)
    return AxisRange(min(values), min(max(opt, min(values)), max(values)), max(values), why)


def _role_range(role: AxisRole, request: ProfileRequest, batch: tuple[int, int], batch_why: str) -> AxisRange:
    if role is AxisRole.BATCH:
        return _span(batch, batch[0], batch_why)
    if role is AxisRole.SEQUENCE:
        n = request.max_text_length
        return AxisRange(n, n, n, "the tokenizer always pads to max_length")
    if role is AxisRole.CONTEXT:
        return _span((1, request.max_text_length), request.opt_context, "cut context: 1..max_length, data-dependent")
    raise AssertionError(f"no profile rule for axis role {role}")


def _spatial(axis: str, role: AxisRole, request: ProfileRequest) -> AxisRange:
    """Height-like axes take each resolution's height, width-like axes its width (by the axis name)."""
    side = latent_side if role is AxisRole.LATENT else round_pixels
    index = 1 if "width" in axis else 0
    values = [side(size[index]) for size in request.resolutions]
    sizes = ", ".join(f"{w}x{h}" for h, w in request.resolutions)
    return AxisRange(min(values), values[0], max(values), f"--resolution {sizes}")


def axis_ranges(component: str, request: ProfileRequest) -> dict[str, AxisRange]:
    """The requested range of every dynamic axis of `component` (before checking it against the artifacts),
    from the roles and batch rule on its card."""
    spec = card(component)
    lo, hi = request.batch
    batch = spec.batch_rule.span(lo, hi, request.guidance)
    batch_why = f"--batch {lo}-{hi}" + spec.batch_rule.why(request.guidance)
    return {name: (_spatial(name, axis.role, request) if axis.role in (AxisRole.LATENT, AxisRole.PIXEL)
                   else _role_range(axis.role, request, batch, batch_why))
            for name, axis in spec.axes.items()}


def check_axes(record: OnnxRecord, ranges: Mapping[str, AxisRange]) -> None:
    """Every range inside the manifest's axis range and on its required multiple; else a ShapeError."""
    multiples = record.extra.get("multiples", {})
    for axis, rng in ranges.items():
        if axis not in record.axes:
            raise ArtifactError(f"{record.component} has no dynamic axis {axis!r} in the manifest",
                                accepted=", ".join(record.axes), fix="re-export with this version of k3trt")
        lo, hi = record.axes[axis]
        multiple = int(multiples.get(axis, 1))
        bad_multiple = [v for v in (rng.min, rng.opt, rng.max) if v % multiple]
        if rng.min < lo or rng.max > hi or bad_multiple:
            raise ShapeError(
                f"{record.component} axis {axis!r} would need {rng.min}..{rng.max} (from {rng.why})",
                accepted=f"{lo}..{hi}" + (f", multiples of {multiple}" if multiple > 1 else "")
                + " (the exported ONNX's range in the manifest)",
                fix="ask for a smaller resolution/batch, or re-export with a wider axis range")


def input_profiles(record: OnnxRecord, ranges: Mapping[str, AxisRange]) -> tuple[InputProfile, ...]:
    """min/opt/max shape of every ONNX input: fixed dims as exported, named dims from `ranges`."""
    out = []
    for spec in record.inputs:
        dims = []
        for dim in spec.shape:
            if isinstance(dim, int):
                dims.append((dim, dim, dim))
            elif dim in ranges:
                rng = ranges[dim]
                dims.append((rng.min, rng.opt, rng.max))
            else:
                raise ArtifactError(f"{record.component}.{spec.name} has a dimension {dim!r} no profile covers",
                                    accepted=", ".join(ranges), fix="re-export with this version of k3trt")
        out.append(InputProfile(spec.name, *(tuple(d[i] for d in dims) for i in range(3))))
    return tuple(out)


def derive_profile(record: OnnxRecord, request: ProfileRequest) -> ComponentProfile:
    ranges = axis_ranges(record.component, request)
    check_axes(record, ranges)
    return ComponentProfile(record.component, tuple(ranges.items()), input_profiles(record, ranges))
