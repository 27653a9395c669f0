"""The export recipe of each component, keyed by its card (k3trt.contract.cards): torch wrapper, sample inputs,
trace and validation shapes. What the component *is* (I/O, axes, multiples, precision, tolerances) is on the card.

`trace` dims are what torch.onnx.export sees; `validate` dims differ from them in every dynamic axis, so a
dimension accidentally baked in as a constant fails validation instead of shipping.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from k3trt.contract.cards import CARDS, MAX_TEXT_LENGTH, ComponentCard, TensorSpec, card
from k3trt.contract.errors import ArtifactError


class TextEncoderOnnx(torch.nn.Module):
    """input_ids, attention_mask (int32: TensorRT-friendly) -> last hidden state."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids.long(), attention_mask=attention_mask.long())[0]


class UNetOnnx(torch.nn.Module):
    """sample, timestep (float32, B), context, context mask (float32 0/1) -> noise prediction.

    The mask stays 0/1 at the interface: the U-Net turns it into a -10000 bias itself, which is what keeps the
    fully-masked unconditional row finite. `encoder_hid_proj` runs inside, as in diffusers."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]


class MoVQDecoderOnnx(torch.nn.Module):
    """latents -> image in [-1, 1] (before the pipeline's x*0.5+0.5 clamp), `force_not_quantize=True`."""

    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, latents):
        return self.movq.decode(latents, force_not_quantize=True).sample


def _text_inputs(dims: dict, info: dict, gen: torch.Generator) -> dict:
    b, s = dims["batch"], dims["sequence"]
    ids = torch.randint(3, info["vocab_size"], (b, s), generator=gen, dtype=torch.int32)
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    mask = (torch.arange(s)[None, :] < lengths[:, None]).to(torch.int32)
    mask[0, :] = 1  # one full row, one with padding at least
    return {"input_ids": ids * mask, "attention_mask": mask}


def _unet_inputs(dims: dict, info: dict, gen: torch.Generator) -> dict:
    b, h, w, ctx = dims["batch"], dims["height"], dims["width"], dims["context"]
    mask = (torch.rand(b, ctx, generator=gen) > 0.3).to(torch.float32)
    mask[0] = 0.0  # a fully-masked (unconditional) row: finite only thanks to the -10000 bias
    if b > 1:
        mask[1] = 1.0
    hidden = torch.randn(b, ctx, info["context_dim"], generator=gen) * mask[..., None]
    return {
        "sample": torch.randn(b, 4, h, w, generator=gen),
        "timestep": torch.randint(1, 1000, (b,), generator=gen).to(torch.float32),
        "encoder_hidden_states": hidden,
        "encoder_attention_mask": mask,
    }


def _movq_inputs(dims: dict, info: dict, gen: torch.Generator) -> dict:
    return {"latents": torch.randn(dims["batch"], 4, dims["height"], dims["width"], generator=gen)}


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """How to export one component: the export-only facts (weights folder, torch wrapper, sample inputs, trace
    and validation shapes), keyed by its card. Everything else (I/O, axes, multiples, tolerances) is the card's."""

    card: ComponentCard
    folder: str  # diffusers sub-folder holding its weights
    wrapper: Callable[[torch.nn.Module], torch.nn.Module]
    make_inputs: Callable[[dict, dict, torch.Generator], dict]
    trace: dict
    validate: tuple[dict, ...]

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.card.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.card.outputs

    @property
    def axes(self) -> dict:  # axis -> (min, max), inclusive
        return self.card.ranges()

    @property
    def multiples(self) -> dict:  # axis -> required multiple
        return self.card.multiples()

    @property
    def rel_l2_fp32(self) -> float:  # fp32 ONNX Runtime vs torch: both compute in fp32, only op order differs
        return self.card.parity_tolerance("fp32").rel_l2

    def dynamic_axes(self) -> dict:
        return self.card.dynamic_axes()

    def is_dynamic(self, dim) -> bool:
        return self.card.is_dynamic(dim)

    def resolved(self, tensors: tuple[TensorSpec, ...], constants: dict) -> tuple[TensorSpec, ...]:
        return self.card.resolved(tensors, constants)

    @property
    def input_names(self) -> list[str]:
        return self.card.input_names

    @property
    def output_names(self) -> list[str]:
        return self.card.output_names


SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        CARDS["text_encoder"], "text_encoder", TextEncoderOnnx, make_inputs=_text_inputs,
        trace={"batch": 2, "sequence": 16},
        validate=({"batch": 1, "sequence": MAX_TEXT_LENGTH}, {"batch": 3, "sequence": 77}),
    ),
    "unet": ComponentSpec(
        CARDS["unet"], "unet", UNetOnnx, make_inputs=_unet_inputs,
        trace={"batch": 2, "height": 16, "width": 16, "context": 12},
        validate=({"batch": 1, "height": 8, "width": 24, "context": 1},
                  {"batch": 3, "height": 24, "width": 40, "context": 77}),
    ),
    "movq_decoder": ComponentSpec(
        CARDS["movq_decoder"], "movq", MoVQDecoderOnnx, make_inputs=_movq_inputs,
        trace={"batch": 2, "height": 8, "width": 8},
        validate=({"batch": 1, "height": 16, "width": 8}, {"batch": 3, "height": 24, "width": 40}),
    ),
}


def component_spec(name: str) -> ComponentSpec:
    card(name)  # unknown names: the card registry's typed error
    if name not in SPECS:
        raise ArtifactError(f"component {name!r} has a card but no export recipe", accepted=", ".join(SPECS),
                            fix=f"add its recipe to SPECS in {__name__}")
    return SPECS[name]


def model_info(source, spec: ComponentSpec) -> dict:
    """The few config numbers sample inputs need (vocab size, context width)."""
    if spec.name == "text_encoder":
        config = source.config("text_encoder")
        return {"vocab_size": config["vocab_size"], "hidden": config["d_model"]}
    if spec.name.startswith("unet"):
        return {"context_dim": source.config(spec.folder)["encoder_hid_dim"]}
    return {}


# ----------------------------------------------------------------------------------------- task components
from k3trt.export.task_components import (  # noqa: E402
    MoVQEncoderOnnx,
    movq_encoder_inputs,
    variant_unet_inputs,
    variant_unet_wrapper,
)

SPECS["movq_encoder"] = ComponentSpec(
    CARDS["movq_encoder"], "movq", MoVQEncoderOnnx, make_inputs=movq_encoder_inputs,
    trace={"batch": 2, "image_height": 64, "image_width": 64},
    validate=({"batch": 1, "image_height": 128, "image_width": 64},
              {"batch": 3, "image_height": 64, "image_width": 192}))
for _name, _channels in (("unet_inpainting", 9), ("unet_flash", 4)):
    SPECS[_name] = ComponentSpec(CARDS[_name], _name, variant_unet_wrapper, make_inputs=variant_unet_inputs(_channels),
                                 trace=SPECS["unet"].trace, validate=SPECS["unet"].validate)


def default_components(source) -> list[str]:
    """Every component whose weights the source holds: the inpainting and Flash U-Nets only where present."""
    return [name for name, spec in SPECS.items() if source.has(spec.folder)]
