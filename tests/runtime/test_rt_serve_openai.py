"""`k3trt serve` driven by the official OpenAI Python SDK (sync and async) over loopback, on the tiny artifacts:
the OpenAI Images API as a tested contract (generate, edit as multipart, models, errors, optional fields)."""
import asyncio
import base64
import io

import numpy as np
import pytest
from serve_helpers import running, wait_ready

openai = pytest.importorskip("openai", reason="the OpenAI SDK tests need `openai` (in `dev`)")
pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")

from PIL import Image  # noqa: E402

from k3trt.runtime import Pipeline  # noqa: E402
from k3trt.contract.tensor_metrics import psnr  # noqa: E402
from k3trt.runtime.serving.http import ImageService, ServeSettings  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def base(pipe, tiny_artifacts):
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=2, max_batch=4, max_queue=8)
    with running(ImageService(settings, pipeline=pipe)) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def picture():
    from k3trt.verify.task_demo import demo_image

    return demo_image()  # 64 x 128 RGB


@pytest.fixture(scope="module")
def white_mask():
    from k3trt.verify.task_demo import demo_mask

    return demo_mask()  # 64 x 128, 255 = repaint


def png(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def openai_mask(white_mask) -> bytes:
    """OpenAI's mask convention: an RGBA PNG whose transparent pixels (alpha 0) are the area to edit."""
    rgba = np.full(white_mask.shape + (4,), 255, np.uint8)
    rgba[..., 3] = np.where(white_mask > 127, 0, 255)
    return png(rgba, "RGBA")


def test_generate_parses_into_the_sdk_types_and_each_seed_reproduces_its_image(client, pipe):
    answer = client.images.generate(prompt="a red fox", size="64x64", n=2, extra_body={"seed": 7, "steps": 2})
    assert isinstance(answer, openai.types.ImagesResponse) and len(answer.data) == 2
    assert answer.size == "64x64" and answer.output_format == "png"
    seeds = [item.model_extra["seed"] for item in answer.data]
    assert seeds == [7, 8]
    for item, seed in zip(answer.data, seeds):
        [alone] = pipe.generate("a red fox", seed=seed, steps=2, height=64, width=64)
        assert psnr(np.asarray(alone, np.float32) / 255, pixels(item.b64_json) / np.float32(255)) >= 60.0


def test_edit_multipart_with_an_alpha_mask_equals_pipeline_inpaint(client, pipe, picture, white_mask):
    """The issue's done-when: the PNG from images.edit (multipart, OpenAI mask) equals Pipeline.inpaint."""
    answer = client.images.edit(image=("fox.png", png(picture), "image/png"), prompt="a fox in the snow",
                                mask=("mask.png", openai_mask(white_mask), "image/png"),
                                extra_body={"seed": 11, "steps": 3})
    [expected] = pipe.inpaint("a fox in the snow", picture, white_mask, steps=3, seed=11)
    assert answer.data[0].model_extra["seed"] == 11
    np.testing.assert_array_equal(pixels(answer.data[0].b64_json), np.asarray(expected))


def test_edit_without_a_mask_is_image_to_image(client, pipe, picture):
    answer = client.images.edit(image=("fox.png", png(picture), "image/png"), prompt="a fox",
                                extra_body={"seed": 2, "steps": 4, "strength": 0.5})
    [expected] = pipe.img2img("a fox", picture, strength=0.5, steps=4, seed=2)
    np.testing.assert_array_equal(pixels(answer.data[0].b64_json), np.asarray(expected))


def test_create_variation_is_image_to_image_with_a_prompt(client, pipe, picture):
    answer = client.images.create_variation(image=("fox.png", png(picture), "image/png"),
                                            extra_body={"prompt": "a fox", "seed": 4, "steps": 4, "strength": 0.5})
    [expected] = pipe.img2img("a fox", picture, strength=0.5, steps=4, seed=4)
    np.testing.assert_array_equal(pixels(answer.data[0].b64_json), np.asarray(expected))
    with pytest.raises(openai.BadRequestError, match="extra_body") as raised:
        client.images.create_variation(image=("fox.png", png(picture), "image/png"))
    assert raised.value.code == "missing_required_parameter"


def test_models_list_names_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["kandinsky-3"]
    assert client.models.retrieve("kandinsky-3").owned_by == "k3trt"


@pytest.mark.parametrize("call, param, code", [
    (lambda c, p: c.images.generate(prompt="x", size="100x64"), "size", "invalid_value"),
    (lambda c, p: c.images.generate(prompt="x", n=9), "n", "invalid_value"),
    (lambda c, p: c.images.generate(prompt="x", output_format="gif"), "output_format", "invalid_value"),
    (lambda c, p: c.images.generate(prompt="x", extra_body={"sed": 1}), "sed", "unknown_parameter"),
    (lambda c, p: c.images.edit(image=("a.png", png(p), "image/png"), prompt="x", size="64x64",
                                extra_body={"steps": 4}), "size", "invalid_value"),
    (lambda c, p: c.images.edit(image=("a.png", b"not an image", "image/png"), prompt="x"), "image",
     "invalid_value"),
], ids=["size", "n", "gif", "unknown", "edit-size", "edit-image"])
def test_invalid_parameters_raise_bad_request_with_a_string_code(client, picture, call, param, code):
    with pytest.raises(openai.BadRequestError) as raised:
        call(client, picture)
    assert raised.value.status_code == 400 and raised.value.code == code and raised.value.param == param
    assert "accepted" in raised.value.message and "fix" in raised.value.message


def test_an_all_keep_mask_is_refused_before_any_work(client, picture):
    opaque = np.full(picture.shape[:2] + (4,), 255, np.uint8)
    opaque[..., 3] = 255
    opaque[0, 0, 3] = 200  # has alpha, not fully opaque, yet nothing is transparent enough to edit
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=("a.png", png(picture), "image/png"), prompt="x",
                           mask=("m.png", png(opaque, "RGBA"), "image/png"))
    assert raised.value.code == "mask_keeps_everything" and raised.value.param == "mask"
    black = np.zeros(picture.shape[:2], np.uint8)  # no alpha: white = edit, and nothing is white
    with pytest.raises(openai.BadRequestError, match="marks nothing to edit"):
        client.images.edit(image=("a.png", png(picture), "image/png"), prompt="x",
                           mask=("m.png", png(black, "L"), "image/png"))


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_compression_are_honoured(client, fmt, pil_format):
    answer = client.images.generate(prompt="a fox", size="64x64", output_format=fmt, output_compression=80,
                                    extra_body={"seed": 1, "steps": 1})
    assert answer.output_format == fmt
    assert Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).format == pil_format


def test_ignored_openai_fields_are_named_in_a_header(client):
    raw = client.images.with_raw_response.generate(prompt="a fox", size="auto", style="vivid", moderation="low",
                                                   quality="auto", extra_body={"steps": 1})
    assert raw.headers["x-k3trt-ignored-fields"] == "style,moderation"
    assert raw.parse().size == "64x64"  # size "auto": the server's default


def test_the_async_client_works_too(base):
    async def call():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
            answers = await asyncio.gather(*(client.images.generate(prompt=f"fox {i}", size="64x64",
                                                                    extra_body={"seed": i, "steps": 1})
                                             for i in range(3)))
        return [answer.data[0].model_extra["seed"] for answer in answers]

    assert asyncio.run(call()) == [0, 1, 2]


def test_quality_is_a_steps_preset_unless_steps_is_given():
    from k3trt.runtime.serving.schema import Limits, to_request

    limits = Limits(default_size="64x64", default_steps=7, max_steps=60)
    assert to_request({"prompt": "x", "quality": "low"}, limits).steps == 12
    assert to_request({"prompt": "x", "quality": "max"}, limits).steps == 60  # capped at the server's limit
    assert to_request({"prompt": "x", "quality": "auto"}, limits).steps == 7
    assert to_request({"prompt": "x", "quality": "high", "steps": 3}, limits).steps == 3
