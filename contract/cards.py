"""One frozen card per exported component: the single place that knows what a component is.

A card says what every stage needs and nothing about how to make the component: its input/output names,
dtypes and axes, each dynamic axis's range, required multiple and role (which request quantity sets it), the
batch rule of its optimization profile, its default precision and the nodes kept fp32 in each reduced-precision
variant, and the parity tolerances per precision. Export (how to trace the torch module), calibration, engines
and the runtime all read cards; adding a component is adding a card here plus its export recipe, keyed by the
card's name, in `k3trt.export.components`.

Facts written once here (see shared/notes/kandinsky3.md):
- diffusers rounds image sides up to a multiple of 64 px; MoVQ maps 8x8 pixels to one latent cell, so latent
  sides are multiples of 8 (which the U-Net also needs: it halves them three times).
- classifier-free guidance runs [uncond, cond] in one U-Net call: the U-Net batch is twice the images.
- the tokenizer pads to 128 tokens; the U-Net context is cut to 1..128 (the longest prompt + 1).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from types import MappingProxyType
from typing import Mapping

from k3trt.contract.errors import InvalidArgumentError

# ----------------------------------------------------------------------------------------- shared geometry
PIXEL_MULTIPLE = 64  # diffusers' downscale_height_and_width rounds image sides up to this
LATENT_FACTOR = 8  # MoVQ: pixels per latent cell along each side
LATENT_MULTIPLE = PIXEL_MULTIPLE // LATENT_FACTOR  # 8: a rounded image always gives latents on this grid
GUIDANCE_BATCH_FACTOR = 2  # classifier-free guidance: [uncond, cond] in one U-Net call
MAX_TEXT_LENGTH = 128  # the pipeline tokenizes (and pads) to 128 tokens
OPT_CONTEXT = 77  # profile opt for the cut context: mid-range for typical prompts (engines/profiles.py says why)


def round_pixels(pixels: int) -> int:
    """An image side as diffusers produces it: rounded up to a multiple of 64 px."""
    return math.ceil(pixels / PIXEL_MULTIPLE) * PIXEL_MULTIPLE


def latent_side(pixels: int) -> int:
    """Latent cells along an image side of `pixels` (after diffusers' rounding): 1024 px -> 128."""
    return round_pixels(pixels) // LATENT_FACTOR


def guided_batch(images: int, guided: bool) -> int:
    """U-Net batch for `images` latents: doubled under classifier-free guidance."""
    return images * (GUIDANCE_BATCH_FACTOR if guided else 1)


# ----------------------------------------------------------------------------------------- card parts
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, int64
    shape: tuple  # ints for fixed dims, axis names (keys of OnnxRecord.axes) for dynamic ones


class AxisRole(str, enum.Enum):
    """Which request quantity sets a dynamic axis (the profile rule reads this)."""

    BATCH = "batch"  # images per call, times the card's batch rule
    LATENT = "latent"  # latent side of the requested resolutions
    PIXEL = "pixel"  # image side of the requested resolutions (rounded to 64 px)
    SEQUENCE = "sequence"  # token sequence: fixed at the tokenizer's max length
    CONTEXT = "context"  # cut text context: 1..max length, data-dependent


@dataclasses.dataclass(frozen=True)
class Axis:
    min: int
    max: int
    role: AxisRole
    multiple: int = 1


class BatchRule(str, enum.Enum):
    """How a component's batch follows the number of images per pipeline call."""

    IMAGES = "images"  # one row per image
    GUIDED = "guided"  # x2 under classifier-free guidance ([uncond, cond] in one call)
    PROMPTS = "prompts"  # prompt and negative prompt may share one call: 1x..2x under guidance

    def span(self, lo: int, hi: int, guided: bool) -> tuple[int, int]:
        """(min, max) batch for lo..hi images per call."""
        if self is BatchRule.GUIDED:
            return guided_batch(lo, guided), guided_batch(hi, guided)
        if self is BatchRule.PROMPTS:
            return lo, guided_batch(hi, guided)
        return lo, hi

    def why(self, guided: bool) -> str:
        if self is BatchRule.GUIDED and guided:
            return f" x{GUIDANCE_BATCH_FACTOR} for classifier-free guidance"
        if self is BatchRule.PROMPTS and guided:
            return f" (prompt + negative prompt in one call: up to {GUIDANCE_BATCH_FACTOR}x)"
        return ""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Bounds on a component output against its fp32 torch reference (NaN/Inf always fails)."""

    rel_l2: float
    cosine: float

    def bounds(self) -> dict:
        return {"rel_l2": self.rel_l2, "cosine": self.cosine}


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """What precisions a component may run in and which of its nodes stay fp32 in each.

    `converted`: float variants made from the fp32 ONNX by the converter; `quantized`: Q/DQ variants made by
    calibration; `fp32_islands`: precision -> name of the node policy (the node finders live in export)."""

    default: str
    converted: tuple[str, ...]
    quantized: tuple[str, ...] = ()
    fp32_islands: Mapping[str, str] = dataclasses.field(default_factory=dict)
    why: str = ""

    @property
    def variants(self) -> tuple[str, ...]:
        return ("fp32",) + self.converted + self.quantized

    def __post_init__(self):
        object.__setattr__(self, "fp32_islands", MappingProxyType(dict(self.fp32_islands)))

    def islands(self, precision: str) -> str:
        return self.fp32_islands.get(precision, "none")


# Parity of a component run from its ONNX variant on the runtime's backend, against torch fp32 (what
# `k3trt parity` and the variant verification enforce). fp32 and the converted variants are measured on the CPU
# (docs/precision.md); int8/fp8 are engineering targets.
PARITY = MappingProxyType({
    "fp32": Tolerance(1e-4, 0.99999), "tf32": Tolerance(5e-3, 0.9999), "fp16": Tolerance(2e-2, 0.9998),
    "bf16": Tolerance(5e-2, 0.998), "int8": Tolerance(0.2, 0.97), "fp8": Tolerance(0.25, 0.97)})
# TensorRT engines against the fp32 references (`k3trt selftest --gpu`). NOT YET VERIFIED ON A GPU: set from each
# format's rounding (fp32 ~1e-7, tf32 10-bit and bf16 7-bit mantissas, fp16 10-bit with fp32 islands) and the CPU
# measurements in shared/notes/kandinsky3.md. Tighten or loosen them once a GPU run has printed real numbers.
ENGINE = MappingProxyType({
    "fp32": Tolerance(1e-3, 0.99999), "tf32": Tolerance(2e-2, 0.9999), "fp16": Tolerance(5e-2, 0.999),
    "bf16": Tolerance(1e-1, 0.995), "int8": Tolerance(0.25, 0.97), "fp8": Tolerance(0.25, 0.97)})
# End-to-end image PSNR against the fp32 reference, by the lowest precision any component runs in.
IMAGE_PSNR_DB = MappingProxyType({"fp32": 40.0, "tf32": 35.0, "fp16": 30.0, "bf16": 25.0, "int8": 20.0,
                                  "fp8": 18.0})


# ----------------------------------------------------------------------------------------- the card
@dataclasses.dataclass(frozen=True)
class ComponentCard:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: Mapping[str, Axis]  # the dynamic input axes
    derived: Mapping[str, tuple[str, int]]  # output-only axis -> (input axis, factor), e.g. image = latent x 8
    batch_rule: BatchRule
    precision: PrecisionPolicy
    parity: Mapping[str, Tolerance] = dataclasses.field(default_factory=lambda: PARITY)
    engine: Mapping[str, Tolerance] = dataclasses.field(default_factory=lambda: ENGINE)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def __post_init__(self):  # frozen all the way down: a card's tables cannot be edited at run time
        for name in ("axes", "derived", "parity", "engine"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Dynamic axis -> inclusive (min, max), as the manifest records them."""
        return {n: (a.min, a.max) for n, a in self.axes.items()}

    def multiples(self) -> dict[str, int]:
        return {n: a.multiple for n, a in self.axes.items() if a.multiple > 1}

    def is_dynamic(self, dim) -> bool:
        # model constants ("hidden", "context_dim") are named in specs but fixed in the graph
        return isinstance(dim, str) and (dim in self.axes or dim in self.derived)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: tensor -> {dim index: axis name}."""
        spec = {}
        for tensor in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(tensor.shape) if self.is_dynamic(d)}
            if named:
                spec[tensor.name] = named
        return spec

    def resolved(self, tensors: tuple[TensorSpec, ...], constants: Mapping) -> tuple[TensorSpec, ...]:
        """Specs with model constants replaced by their values, as the manifest records them."""
        return tuple(TensorSpec(t.name, t.dtype, tuple(constants.get(d, d) if isinstance(d, str) else d
                                                       for d in t.shape)) for t in tensors)

    def parity_tolerance(self, precision: str) -> Tolerance:
        return self.parity[str(precision)]

    def engine_tolerance(self, precision: str) -> Tolerance:
        return self.engine[str(precision)]


def _latent(lo: int, hi: int, multiple: int = 1) -> Axis:
    return Axis(lo, hi, AxisRole.LATENT, multiple)


UNET_ISLANDS = {"fp16": "unet_time_projection", "bf16": "unet_time_projection"}
MOVQ_ISLANDS = {"fp16": "movq_norms_softmax", "bf16": "movq_norms_softmax"}  # decoder and encoder alike


def _variant_unet(name: str, channels: int, batch_rule: BatchRule, why: str) -> ComponentCard:
    """A U-Net variant: the base U-Net's I/O and axes with `channels` input channels and its own batch rule."""
    return ComponentCard(
        name,
        inputs=(TensorSpec("sample", "float32", ("batch", channels, "height", "width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "context", "context_dim")),
                TensorSpec("encoder_attention_mask", "float32", ("batch", "context"))),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", 4, "height", "width")),),
        axes={"batch": Axis(1, 64, AxisRole.BATCH), "height": _latent(8, 256, LATENT_MULTIPLE),
              "width": _latent(8, 256, LATENT_MULTIPLE), "context": Axis(1, MAX_TEXT_LENGTH, AxisRole.CONTEXT)},
        derived={}, batch_rule=batch_rule,
        precision=PrecisionPolicy("fp16", ("fp16", "bf16"), ("int8", "fp8"), fp32_islands=UNET_ISLANDS, why=why))


CARDS: Mapping[str, ComponentCard] = MappingProxyType({
    "text_encoder": ComponentCard(
        "text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),
                TensorSpec("attention_mask", "int32", ("batch", "sequence"))),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),),
        axes={"batch": Axis(1, 32, AxisRole.BATCH), "sequence": Axis(1, MAX_TEXT_LENGTH, AxisRole.SEQUENCE)},
        derived={}, batch_rule=BatchRule.PROMPTS,
        precision=PrecisionPolicy(
            "bf16", ("fp16", "bf16"), fp32_islands={"fp16": "t5_norms_wo_residual", "bf16": "t5_norms"},
            why="T5 activations pass fp16's 65504 (FFN output `wo`, residual stream); bf16 has fp32's exponent "
                "range. fp16 keeps the RMSNorms, `wo` and the residual Adds fp32 (transformers keeps `wo` fp32 "
                "for this reason); bf16 keeps the norms fp32 (T5LayerNorm computes its variance in fp32)."),
    ),
    "unet": ComponentCard(
        "unet",
        inputs=(TensorSpec("sample", "float32", ("batch", 4, "height", "width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "context", "context_dim")),
                TensorSpec("encoder_attention_mask", "float32", ("batch", "context"))),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", 4, "height", "width")),),
        axes={"batch": Axis(1, 64, AxisRole.BATCH), "height": _latent(8, 256, LATENT_MULTIPLE),
              "width": _latent(8, 256, LATENT_MULTIPLE), "context": Axis(1, MAX_TEXT_LENGTH, AxisRole.CONTEXT)},
        derived={}, batch_rule=BatchRule.GUIDED,
        precision=PrecisionPolicy(
            "fp16", ("fp16", "bf16"), ("int8", "fp8"), fp32_islands=UNET_ISLANDS,
            why="fp16 (the bulk of the FLOPs) except the sinusoidal timestep projection: sin/cos(t x f) for t "
                "up to 999 needs fp32 arguments (fp16 spaces 999 by 0.5); measured on the small preset, it was "
                "the one layer whose error jumped (rel L2 9.7e-2 at Sin). int8/fp8 only from an explicit Q/DQ "
                "variant whose non-quantized parts are fp16 (a strongly typed engine runs them in the ONNX's "
                "float type)."),
    ),
    "movq_decoder": ComponentCard(
        "movq_decoder",
        inputs=(TensorSpec("latents", "float32", ("batch", 4, "height", "width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        axes={"batch": Axis(1, 32, AxisRole.BATCH), "height": _latent(1, 256), "width": _latent(1, 256)},
        derived={"image_height": ("height", LATENT_FACTOR), "image_width": ("width", LATENT_FACTOR)},
        batch_rule=BatchRule.IMAGES,
        precision=PrecisionPolicy(
            "fp16", ("fp16", "bf16"), fp32_islands=MOVQ_ISLANDS,
            why="GroupNorm/SpatialNorm statistics over 16k positions and the 16k x 16k attention softmax are "
                "where fp16 loses accuracy: they stay fp32."),
    ),
    # --- the task components (image to image, inpainting, Flash; docs/tasks.md)
    "movq_encoder": ComponentCard(
        "movq_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        outputs=(TensorSpec("latents", "float32", ("batch", 4, "height", "width")),),
        axes={"batch": Axis(1, 32, AxisRole.BATCH), "image_height": Axis(64, 2048, AxisRole.PIXEL, PIXEL_MULTIPLE),
              "image_width": Axis(64, 2048, AxisRole.PIXEL, PIXEL_MULTIPLE)},
        derived={"height": ("image_height", LATENT_FACTOR), "width": ("image_width", LATENT_FACTOR)},
        batch_rule=BatchRule.IMAGES,
        precision=PrecisionPolicy(
            "fp16", ("fp16", "bf16"), fp32_islands=MOVQ_ISLANDS,
            why="the decoder's mirror: GroupNorm statistics at full resolution and the lowest level's attention "
                "softmax stay fp32; it runs once per image-to-image or inpainting request."),
    ),
    "unet_inpainting": _variant_unet(
        "unet_inpainting", 9, BatchRule.GUIDED,
        "the base U-Net's policy; its 9 input channels are latents (4), the keep mask (1) and the masked image's "
        "latents (4). int8 from a Q/DQ variant calibrated on masked trajectories."),
    "unet_flash": _variant_unet(
        "unet_flash", 4, BatchRule.IMAGES,
        "the base U-Net's policy; Kandinsky 3.1 Flash runs without guidance, so its batch is the images, not 2x."),
})
COMPONENTS: tuple[str, ...] = tuple(CARDS)


def card(name: str) -> ComponentCard:
    """The card of `name`, or a typed error listing the known components."""
    if name not in CARDS:
        raise InvalidArgumentError(f"unknown component {name!r}", accepted=", ".join(CARDS),
                                   fix="e.g. --components " + ",".join(CARDS))
    return CARDS[name]


def quantizable_components(precision: str = "int8") -> tuple[str, ...]:
    """Components whose card allows a `precision` Q/DQ variant (`k3trt calibrate`), in card order."""
    return tuple(name for name, c in CARDS.items() if precision in c.precision.quantized)
