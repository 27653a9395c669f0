"""The OpenAI Images API request body, validated by hand into a runtime Request.

By hand rather than a pydantic model because every rejection must name the field, what is accepted and the fix
in this project's error shape, before any work starts; the rules are few and each is tested.
Body: {"prompt", "n", "size": "WxH", "response_format": "b64_json"} plus this model's "negative_prompt",
"seed", "steps", "guidance"; "model" and "user" (sent by OpenAI clients) are accepted and ignored.

Edits (`to_edit`) take JSON too, with the image and mask as base64 strings, not OpenAI's multipart form: one body
parser and one validation path for both routes, and no multipart dependency (python-multipart) in the server.
The images are decoded here, before queueing, with their sides checked from the header before any pixel is
decoded (no decompression bombs), so the worker only ever sees images the service accepts.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import re
import secrets

from k3trt.contract.cards import PIXEL_MULTIPLE
from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime import tasks
from k3trt.runtime.images import check_strength, decode_errors, load_image
from k3trt.runtime.pipeline import Request, make_request

MAX_BODY_BYTES = 64 * 1024
MAX_EDIT_BODY_BYTES = 16 * 1024 * 1024  # /v1/images/edits: the image and mask inline, base64 (4/3 of their bytes)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PROMPT_CHARS = 4000
IGNORED_FIELDS = ("model", "user")
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


class FieldError(InvalidArgumentError):
    """A request field is missing, malformed or out of range; `param` names it (HTTP 422)."""

    def __init__(self, param: str | None, what: str, *, accepted: str | None = None, fix: str | None = None):
        self.param = param
        super().__init__(what, accepted=accepted, fix=fix)


class BodyError(FieldError):
    """The body itself is unusable: not JSON, not an object, too large (HTTP 400 / 413)."""

    def __init__(self, what: str, *, status: int = 400, accepted: str | None = None, fix: str | None = None):
        self.status = status
        super().__init__(None, what, accepted=accepted, fix=fix)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this service accepts: image sizes from the artifacts' latent range, multiples of 64."""
    min_side: int = 64
    max_side: int = 2048
    max_n: int = 4
    max_steps: int = 200
    default_size: str = "1024x1024"
    default_steps: int = 25
    default_guidance: float = 3.0


def too_large(size, limit: int) -> BodyError:
    fix = "shorten the prompt" if limit == MAX_BODY_BYTES else "send a smaller image (PNG/JPEG/WebP, base64)"
    return BodyError(f"the request body is {size} bytes", status=413, accepted=f"at most {limit} bytes", fix=fix)


def parse_body(raw: bytes, limit: int = MAX_BODY_BYTES) -> dict:
    if len(raw) > limit:
        raise too_large(len(raw), limit)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(f"the request body is not valid JSON ({exc})", accepted="a JSON object",
                        fix='send e.g. {"prompt": "a red fox", "size": "1024x1024"}') from None
    if not isinstance(body, dict):
        raise BodyError(f"the request body is a JSON {type(body).__name__}", accepted="a JSON object",
                        fix='send e.g. {"prompt": "a red fox"}')
    return body


FIELDS = ("prompt", "negative_prompt", "n", "size", "response_format", "seed", "steps", "guidance")


def to_request(body: dict, limits: Limits) -> Request:
    """The validated runtime Request for `body`, or a FieldError naming the first bad field."""
    _no_unknown(body, FIELDS)
    prompt = _text(body, "prompt", required=True)
    negative = _text(body, "negative_prompt", required=False)
    n = _integer(body, "n", 1, 1, limits.max_n)
    steps = _integer(body, "steps", limits.default_steps, 1, limits.max_steps)
    seed = _integer(body, "seed", None, 0, 2 ** 63 - 1)
    guidance = _guidance(body, limits.default_guidance)
    width, height = _size(body.get("size", limits.default_size), limits)
    _response_format(body)
    return make_request(prompt, negative, seed=secrets.randbelow(2 ** 31) if seed is None else seed,
                        steps=steps, guidance=guidance, height=height, width=width, num_images=n)


EDIT_FIELDS = ("prompt", "image", "mask", "outpaint", "strength", "negative_prompt", "n", "response_format", "seed",
               "steps", "guidance")
INPAINT_GUIDANCE = 4.0  # tasks.inpaint's default (the official inpainting pipeline's); image to image: 3.0


def to_edit(body: dict, limits: Limits) -> tuple[Request, "tasks.TaskInputs"]:
    """The Request and task inputs for an edits `body`: a `mask` -> inpainting, `outpaint` -> outpainting,
    neither -> image to image with `strength`; or a FieldError naming the first bad field."""
    _no_unknown(body, EDIT_FIELDS, note=" (the output size is the image's, or the outpainted canvas')")
    prompt = _text(body, "prompt", required=True)
    negative = _text(body, "negative_prompt", required=False)
    n = _integer(body, "n", 1, 1, limits.max_n)
    steps = _integer(body, "steps", limits.default_steps, 1, limits.max_steps)
    seed = _integer(body, "seed", None, 0, 2 ** 63 - 1)
    _response_format(body)
    if body.get("mask") is not None and body.get("outpaint") is not None:
        raise FieldError("outpaint", "both mask and outpaint were given",
                         accepted="mask (inpainting) or outpaint (outpainting), or neither (image to image)",
                         fix="drop outpaint to repaint the mask's white area, or drop mask to extend the image")
    image = _picture(body, "image", limits)
    if body.get("mask") is None and body.get("outpaint") is None:
        strength = _strength(body, steps)
        guidance = _guidance(body, limits.default_guidance)
        inputs = tasks.Img2ImgInputs(_field("image", load_image, image), strength)
    else:
        if body.get("strength") is not None:
            raise FieldError("strength", f"strength={_show(body['strength'])} with a mask or outpaint",
                             accepted="strength for image to image only (no mask, no outpaint)",
                             fix="drop strength: inpainting and outpainting run the whole schedule")
        guidance = _guidance(body, INPAINT_GUIDANCE)
        inputs = _inpaint_inputs(body, image, limits)
    request = _field("prompt", tasks.task_request, inputs, prompt, negative,
                     seed=secrets.randbelow(2 ** 31) if seed is None else seed, steps=steps, guidance=guidance,
                     num_images=n)
    return request, inputs


def _inpaint_inputs(body: dict, image, limits: Limits) -> "tasks.InpaintInputs":
    if body.get("mask") is not None:
        mask = _picture(body, "mask", limits)
        if mask.size != image.size:
            raise FieldError("mask", f"mask is {mask.size[0]}x{mask.size[1]} px but the image is "
                             f"{image.size[0]}x{image.size[1]}", accepted="a mask of the image's size",
                             fix="resize the mask to the image (nearest neighbour keeps it binary)")
        return _field("mask", tasks.inpaint_inputs, image, mask)
    margins = body["outpaint"]
    if not isinstance(margins, str):
        raise FieldError("outpaint", f"outpaint={_show(margins)}", accepted='"SIDE=PIXELS,..." with SIDE in left, '
                         "right, top, bottom", fix='e.g. "outpaint": "left=128,right=128"')
    inputs = _field("outpaint", tasks.inpaint_inputs, image, outpaint=margins)
    height, width = inputs.pixels.shape[-2:]
    if max(height, width) > limits.max_side:
        raise FieldError("outpaint", f"outpaint={_show(margins)} grows the image to {width}x{height} px",
                         accepted=f"a canvas with sides up to {limits.max_side}", fix="use smaller margins")
    return inputs


def _picture(body: dict, name: str, limits: Limits):
    """A base64 PNG/JPEG/WebP (optionally a data: URL) -> a decoded PIL image whose sides this service accepts.
    The sides are read from the header and checked before any pixel is decoded."""
    from PIL import Image

    value = body.get(name)
    accepted = f"a base64 {'/'.join(IMAGE_FORMATS)} image (a data:image/...;base64, prefix is accepted)"
    if not isinstance(value, str) or not value:
        what = f"{name} is missing" if value is None else f"{name}={_show(value)}"
        raise FieldError(name, what, accepted=accepted, fix=f'send "{name}": base64 of the file\'s bytes')
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise FieldError(name, f"{name} is a data URL without ;base64", accepted=accepted,
                             fix="encode the file as base64: data:image/png;base64,...")
    try:
        raw = base64.b64decode(value, validate=True)
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, at twice its pixel limit
        raise FieldError(name, f"{name} is far too large ({exc})", accepted=accepted,
                         fix=f"send an image with sides up to {limits.max_side}") from None
    except (binascii.Error, *decode_errors()) as exc:  # the bomb error is caught above
        raise FieldError(name, f"{name} is not a base64 image ({type(exc).__name__})", accepted=accepted,
                         fix=f"send the base64 of a PNG, JPEG or WebP file as {name}") from None
    width, height = image.size
    if image.format not in IMAGE_FORMATS:
        raise FieldError(name, f"{name} is a {image.format} image", accepted=accepted, fix="convert it to PNG")
    if name == "image" and not all(limits.min_side <= s <= limits.max_side and s % PIXEL_MULTIPLE == 0
                                   for s in (width, height)):
        raise FieldError(name, f"image is {width}x{height} px", accepted=f"sides multiples of {PIXEL_MULTIPLE} "
                         f"in {limits.min_side}..{limits.max_side}", fix="resize or crop it, e.g. to 1024x1024")
    if name == "mask" and width * height > limits.max_side ** 2:
        raise FieldError(name, f"mask is {width}x{height} px", accepted="a mask of the image's size",
                         fix="resize the mask to the image")
    try:
        image.load()  # within the side limits: a bounded decode
    except decode_errors() as exc:
        raise FieldError(name, f"{name} could not be decoded ({type(exc).__name__})", accepted=accepted,
                         fix="re-save the file and send it again") from None
    return image


def _strength(body: dict, steps: int) -> float:
    value = body.get("strength", tasks.IMG2IMG_STRENGTH)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError("strength", f"strength={_show(value)}", accepted="a number in (0, 1]",
                         fix=f'e.g. "strength": {tasks.IMG2IMG_STRENGTH}')
    _field("strength", check_strength, value, steps)
    return float(value)


def _field(param: str, fn, *args, **kwargs):
    """`fn(...)`, with its InvalidArgumentError re-raised as a FieldError naming `param` (HTTP 422)."""
    try:
        return fn(*args, **kwargs)
    except InvalidArgumentError as exc:
        raise FieldError(param, exc.what, accepted=exc.accepted, fix=exc.fix) from None


def _no_unknown(body: dict, fields: tuple[str, ...], note: str = "") -> None:
    unknown = sorted(set(body) - set(fields) - set(IGNORED_FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown field {unknown[0]!r}{note}", accepted=", ".join(fields),
                         fix=f"remove {unknown[0]!r}")


def _response_format(body: dict) -> None:
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise FieldError("response_format", f"response_format={response_format!r}", accepted='"b64_json"',
                         fix="omit it or send \"b64_json\" (this server returns images inline, not URLs)")


def _text(body: dict, name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        what = f"{name} is missing" if value is None else f"{name}={_show(value)}"
        raise FieldError(name, what, accepted="a non-empty string", fix=f'send "{name}": "a red fox in the snow"')
    if len(value) > MAX_PROMPT_CHARS:
        raise FieldError(name, f"{name} has {len(value)} characters", accepted=f"at most {MAX_PROMPT_CHARS}",
                         fix="shorten it (the model reads only the first 128 tokens)")
    return value


def _integer(body: dict, name: str, default, lo: int, hi: int):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FieldError(name, f"{name}={_show(value)}", accepted=f"an integer in {lo}..{hi}",
                         fix=f'e.g. "{name}": {default if default is not None else lo}')
    return value


def _guidance(body: dict, default: float) -> float:
    value = body.get("guidance", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise FieldError("guidance", f"guidance={_show(value)}", accepted="a finite number in 0..100 (<= 1: no CFG)",
                         fix=f'e.g. "guidance": {default}')
    return float(value)


def _size(value, limits: Limits) -> tuple[int, int]:
    match = SIZE_PATTERN.match(value) if isinstance(value, str) else None
    sides = (int(match.group(1)), int(match.group(2))) if match else None
    if sides is None or not all(limits.min_side <= s <= limits.max_side and s % PIXEL_MULTIPLE == 0 for s in sides):
        raise FieldError("size", f"size={_show(value)}",
                         accepted=f'"WxH" with W and H multiples of {PIXEL_MULTIPLE} in {limits.min_side}..{limits.max_side}',
                         fix=f'e.g. "size": "{limits.default_size}"')
    return sides


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
