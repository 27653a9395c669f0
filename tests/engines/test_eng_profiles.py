"""Profiles: requests -> per-input min/opt/max shapes, checked against the manifest's axis ranges."""
from __future__ import annotations

import dataclasses

import pytest

from k3trt.engines.profiles import (derive_profile, latent_size, make_request, parse_batch, parse_resolution)
from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import InvalidArgumentError, ShapeError


@pytest.fixture(scope="module")
def records(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    return {c: manifest.onnx(c) for c in manifest.components()}


def test_parse_resolution_is_width_by_height():
    assert parse_resolution("1024x1024") == (1024, 1024)
    assert parse_resolution("1280x768") == (768, 1280)  # (height, width)
    assert parse_resolution(" 640 X 480 ") == (480, 640)


@pytest.mark.parametrize("bad", ["1024", "0x512", "ax512", "1024x-1", ""])
def test_parse_resolution_rejects_with_the_format(bad):
    with pytest.raises(InvalidArgumentError) as err:
        parse_resolution(bad)
    assert repr(bad) in str(err.value) and "WIDTHxHEIGHT" in str(err.value)


def test_parse_batch():
    assert parse_batch("1-4") == (1, 4)
    assert parse_batch("3") == (3, 3)
    assert parse_batch(2) == (2, 2)
    for bad in ("4-1", "0", "a", "1-"):
        with pytest.raises(InvalidArgumentError, match="MIN-MAX"):
            parse_batch(bad)


def test_latent_size_follows_the_pipeline_rounding():
    assert [latent_size(p) for p in (1024, 1000, 1025, 64, 1)] == [128, 128, 136, 8, 8]


def test_unet_1024_batch_1_to_4(records):
    profile = derive_profile(records["unet"], make_request(["1024x1024"], "1-4"))
    batch, ctx = profile.axis("batch"), profile.axis("context")
    assert (batch.min, batch.opt, batch.max) == (2, 2, 8)  # classifier-free guidance doubles the batch
    assert (ctx.min, ctx.opt, ctx.max) == (1, 77, 128)
    assert profile.axis("height").static and profile.axis("height").max == 128
    shapes = profile.shapes()
    assert shapes["sample"] == ((2, 4, 128, 128), (2, 4, 128, 128), (8, 4, 128, 128))
    assert shapes["timestep"] == ((2,), (2,), (8,))
    assert shapes["encoder_hidden_states"] == ((2, 1, 64), (2, 77, 64), (8, 128, 64))
    assert shapes["encoder_attention_mask"] == ((2, 1), (2, 77), (8, 128))
    assert not profile.static  # L stays dynamic: it depends on the prompt


def test_text_encoder_and_movq(records):
    request = make_request(["1024x1024"], "1-4")
    text = derive_profile(records["text_encoder"], request)
    assert text.shapes()["input_ids"] == ((1, 128), (1, 128), (8, 128))  # prompt + negative in one call
    assert text.axis("sequence").static
    movq = derive_profile(records["movq_decoder"], request)
    assert movq.shapes()["latents"] == ((1, 4, 128, 128), (1, 4, 128, 128), (4, 4, 128, 128))


def test_single_shape_is_static_and_no_guidance_halves_the_unet_batch(records):
    request = make_request(["512x512"], "2", static=True, guidance=False)
    movq = derive_profile(records["movq_decoder"], request)
    assert movq.static and movq.shapes()["latents"][0] == (2, 4, 64, 64)
    unet = derive_profile(records["unet"], request)
    assert (unet.axis("batch").min, unet.axis("batch").max) == (2, 2)


def test_several_resolutions_make_a_range_with_the_first_as_opt(records):
    profile = derive_profile(records["unet"], make_request(["1024x1024", "1280x768"], "1"))
    height, width = profile.axis("height"), profile.axis("width")
    assert (height.min, height.opt, height.max) == (96, 128, 128)
    assert (width.min, width.opt, width.max) == (128, 128, 160)


def test_static_refuses_ranges():
    with pytest.raises(InvalidArgumentError, match="--static needs exactly one"):
        make_request(["1024x1024", "512x512"], "1", static=True)
    with pytest.raises(InvalidArgumentError, match="--static"):
        make_request(["1024x1024"], "1-4", static=True)


def test_out_of_range_requests_name_axis_range_and_fix(records):
    with pytest.raises(ShapeError) as err:
        derive_profile(records["unet"], make_request(["4096x4096"], "1"))
    text = str(err.value)
    assert "'height'" in text and "512" in text and "8..256" in text and "fix:" in text
    with pytest.raises(ShapeError, match="'batch' would need 2..80"):
        derive_profile(records["unet"], make_request(["1024x1024"], "1-40"))


def test_required_multiples_are_enforced(records):
    record = records["unet"]
    strict = dataclasses.replace(record, extra={**record.extra, "multiples": {"height": 16, "width": 16}})
    with pytest.raises(ShapeError, match="multiples of 16"):
        derive_profile(strict, make_request(["1088x1088"], "1"))  # latent 136 is not a multiple of 16
    assert derive_profile(strict, make_request(["1024x1024"], "1")).axis("height").max == 128
