"""Component cards: the one place each component's facts live, read by every stage (issue 10 item 1, issue 8)."""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from k3trt.contract import cards
from k3trt.contract.cards import (CARDS, Axis, AxisRole, BatchRule, ComponentCard, PrecisionPolicy, TensorSpec, card,
                                 guided_batch, latent_side, round_pixels)
from k3trt.contract.errors import InvalidArgumentError


def test_geometry_is_written_once_and_follows_diffusers():
    assert [round_pixels(p) for p in (1, 64, 65, 1000, 1024)] == [64, 64, 128, 1024, 1024]
    assert [latent_side(p) for p in (1024, 1000, 1025, 64, 1)] == [128, 128, 136, 8, 8]
    assert (guided_batch(3, True), guided_batch(3, False)) == (6, 3)


def test_unknown_component_is_a_typed_error_naming_the_known_ones():
    with pytest.raises(InvalidArgumentError, match="unet_v9.*text_encoder, unet, movq_decoder"):
        card("unet_v9")


def test_cards_are_frozen_all_the_way_down():
    unet = card("unet")
    with pytest.raises(dataclasses.FrozenInstanceError):
        unet.batch_rule = BatchRule.IMAGES
    with pytest.raises(TypeError):
        unet.axes["batch"] = Axis(1, 2, AxisRole.BATCH)
    with pytest.raises(TypeError):
        card("text_encoder").precision.fp32_islands["fp16"] = "none"


def test_every_axis_of_every_tensor_is_declared():
    for c in CARDS.values():
        for tensor in c.inputs + c.outputs:
            for dim in tensor.shape:
                assert isinstance(dim, int) or c.is_dynamic(dim) or dim in ("hidden", "context_dim"), (c.name, dim)
        assert set(c.dynamic_axes()) >= set(c.input_names), c.name  # every input has a dynamic batch
        assert c.precision.default in c.precision.variants
        for precision in c.precision.variants:
            assert c.parity_tolerance(precision).rel_l2 <= c.engine_tolerance(precision).rel_l2 or \
                precision in ("int8", "fp8"), (c.name, precision)


def test_precision_policy_says_what_stays_fp32():
    assert card("text_encoder").precision.islands("fp16") == "t5_norms_wo_residual"
    assert card("text_encoder").precision.islands("bf16") == "t5_norms"
    assert card("movq_decoder").precision.islands("fp16") == "movq_norms_softmax"
    assert card("unet").precision.islands("fp16") == "unet_time_projection"
    assert "int8" in card("unet").precision.variants and "int8" not in card("movq_decoder").precision.variants


def test_adding_a_component_is_adding_a_card(monkeypatch):
    """A MoVQ-encoder-like card (pixel axes) gets its engine profile from the generic rule, no engine code."""
    from k3trt.engines.profiles import axis_ranges, make_request

    encoder = ComponentCard(
        "image_encoder", inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        outputs=(TensorSpec("latents", "float32", ("batch", 4, "height", "width")),),
        axes={"batch": Axis(1, 8, AxisRole.BATCH), "image_height": Axis(64, 2048, AxisRole.PIXEL, 64),
              "image_width": Axis(64, 2048, AxisRole.PIXEL, 64)},
        derived={"height": ("image_height", 8), "width": ("image_width", 8)}, batch_rule=BatchRule.IMAGES,
        precision=PrecisionPolicy("fp16", ("fp16",)))
    monkeypatch.setattr(cards, "CARDS", MappingProxyType({**CARDS, "image_encoder": encoder}))
    ranges = axis_ranges("image_encoder", make_request(["1000x768", "512x512"], "1-2"))
    assert (ranges["batch"].min, ranges["batch"].max) == (1, 2)
    assert (ranges["image_height"].min, ranges["image_height"].opt, ranges["image_height"].max) == (512, 768, 768)
    assert (ranges["image_width"].min, ranges["image_width"].max) == (512, 1024)
    assert encoder.dynamic_axes()["latents"] == {0: "batch", 2: "height", 3: "width"}


def test_profile_batch_rules_come_from_the_cards():
    from k3trt.engines.profiles import axis_ranges, make_request

    request = make_request(["1024x1024"], "1-4")
    spans = {name: (axis_ranges(name, request)["batch"].min, axis_ranges(name, request)["batch"].max)
             for name in CARDS}
    assert spans == {"text_encoder": (1, 8), "unet": (2, 8), "movq_decoder": (1, 4), "movq_encoder": (1, 4),
                     "unet_inpainting": (2, 8), "unet_flash": (1, 4)}  # Flash runs without guidance
    unguided = make_request(["1024x1024"], "1-4", guidance=False)
    assert axis_ranges("unet", unguided)["batch"].max == 4


def test_the_task_components_are_cards():
    """The MoVQ encoder and the U-Net variants are cards: their profiles follow from roles and batch rules."""
    from k3trt.engines.profiles import axis_ranges, make_request

    request = make_request(["1024x768"], "1-2")
    encoder = axis_ranges("movq_encoder", request)
    assert (encoder["image_height"].max, encoder["image_width"].max) == (768, 1024)  # pixels, not latents
    assert card("movq_encoder").dynamic_axes()["latents"] == {0: "batch", 2: "height", 3: "width"}
    inpaint = axis_ranges("unet_inpainting", request)
    assert (inpaint["batch"].max, inpaint["height"].max, inpaint["context"].max) == (4, 96, 128)
    assert card("unet_inpainting").inputs[0].shape == ("batch", 9, "height", "width")
    assert card("unet_flash").batch_rule is BatchRule.IMAGES and axis_ranges("unet_flash", request)["batch"].max == 2
