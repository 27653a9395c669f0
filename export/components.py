"""One frozen spec per exported component: names, dtypes, dynamic axes with ranges, sample inputs, tolerance.

`trace` dims are what torch.onnx.export sees; `validate` dims differ from them in every dynamic axis, so a
dimension accidentally baked in as a constant fails validation instead of shipping.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..runtime.artifacts import TensorSpec

MAX_TEXT_LENGTH = 128  # the pipeline tokenizes to 128 and the trimmed context is 1..128
MOVQ_SCALE = 8  # MoVQ up-scales latents 8x
UNET_MULTIPLE = 8  # the U-Net halves latents three times; the pipeline's rounding keeps them multiples of 8


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
    name: str
    folder: str  # diffusers sub-folder holding its weights
    wrapper: Callable[[torch.nn.Module], torch.nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict  # axis -> (min, max), inclusive
    multiples: dict  # axis -> required multiple
    make_inputs: Callable[[dict, dict, torch.Generator], dict]
    trace: dict
    validate: tuple[dict, ...]
    rel_l2_fp32: float = 1e-4  # fp32 ONNX Runtime vs torch: both compute in fp32, only op order differs

    def dynamic_axes(self) -> dict:
        spec = {}
        for tensor in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(tensor.shape) if self.is_dynamic(d)}
            if named:
                spec[tensor.name] = named
        return spec

    def is_dynamic(self, dim) -> bool:
        # model constants ("hidden", "context_dim") are named in specs but fixed in the graph
        return isinstance(dim, str) and (dim in self.axes or dim.startswith("image_"))

    def resolved(self, tensors: tuple[TensorSpec, ...], constants: dict) -> tuple[TensorSpec, ...]:
        """Specs with model constants replaced by their values, as the manifest records them."""
        return tuple(TensorSpec(t.name, t.dtype, tuple(constants.get(d, d) if isinstance(d, str) else d
                                                       for d in t.shape)) for t in tensors)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        "text_encoder", "text_encoder", TextEncoderOnnx,
        inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),
                TensorSpec("attention_mask", "int32", ("batch", "sequence"))),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),),
        axes={"batch": (1, 32), "sequence": (1, MAX_TEXT_LENGTH)}, multiples={},
        make_inputs=_text_inputs,
        trace={"batch": 2, "sequence": 16},
        validate=({"batch": 1, "sequence": MAX_TEXT_LENGTH}, {"batch": 3, "sequence": 77}),
    ),
    "unet": ComponentSpec(
        "unet", "unet", UNetOnnx,
        inputs=(TensorSpec("sample", "float32", ("batch", 4, "height", "width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "context", "context_dim")),
                TensorSpec("encoder_attention_mask", "float32", ("batch", "context"))),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", 4, "height", "width")),),
        axes={"batch": (1, 64), "height": (8, 256), "width": (8, 256), "context": (1, MAX_TEXT_LENGTH)},
        multiples={"height": UNET_MULTIPLE, "width": UNET_MULTIPLE},
        make_inputs=_unet_inputs,
        trace={"batch": 2, "height": 16, "width": 16, "context": 12},
        validate=({"batch": 1, "height": 8, "width": 24, "context": 1},
                  {"batch": 3, "height": 24, "width": 40, "context": 77}),
    ),
    "movq_decoder": ComponentSpec(
        "movq_decoder", "movq", MoVQDecoderOnnx,
        inputs=(TensorSpec("latents", "float32", ("batch", 4, "height", "width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        axes={"batch": (1, 32), "height": (1, 256), "width": (1, 256)}, multiples={},
        make_inputs=_movq_inputs,
        trace={"batch": 2, "height": 8, "width": 8},
        validate=({"batch": 1, "height": 16, "width": 8}, {"batch": 3, "height": 24, "width": 40}),
    ),
}


def component_spec(name: str) -> ComponentSpec:
    from ..runtime.errors import InvalidArgumentError

    if name not in SPECS:
        raise InvalidArgumentError(f"unknown component {name!r}", accepted=", ".join(SPECS),
                                   fix="e.g. --components text_encoder,unet,movq_decoder")
    return SPECS[name]


def model_info(source, spec: ComponentSpec) -> dict:
    """The few config numbers sample inputs need (vocab size, context width)."""
    if spec.name == "text_encoder":
        config = source.config("text_encoder")
        return {"vocab_size": config["vocab_size"], "hidden": config["d_model"]}
    if spec.name == "unet":
        return {"context_dim": source.config("unet")["encoder_hid_dim"]}
    return {}
