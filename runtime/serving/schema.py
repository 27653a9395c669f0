"""The OpenAI Images API request body, validated by hand into a runtime Request.

By hand rather than a pydantic model because every rejection must name the field, what is accepted and the fix
in this project's error shape, before any work starts; the rules are few and each is tested (the pydantic models
in openapi.py only describe the bodies for /openapi.json).
Body: {"prompt", "n", "size": "WxH", "response_format": "b64_json"} plus this model's "negative_prompt",
"seed", "steps", "guidance"; OpenAI's optional fields are read by openai_options.py.

Edits (`to_edit`) take the same dict whether it came from JSON (images as base64 strings) or from OpenAI's
multipart form (forms.py: images as bytes): one validation path for both. The images are decoded here, before
queueing, with their sides checked from the header before any pixel is decoded (no decompression bombs), so the
worker only ever sees images the service accepts. A refusal is a FieldError: HTTP 400 with OpenAI's error
envelope and a string `code`.
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

import numpy as np
from k3trt.contract.cards import PIXEL_MULTIPLE
from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime import tasks
from k3trt.runtime.images import check_strength, decode_errors, load_image
from k3trt.runtime.pipeline import Request, make_request

MAX_BODY_BYTES = 64 * 1024
MAX_EDIT_BODY_BYTES = 16 * 1024 * 1024  # /v1/images/edits: the image and mask inline, base64 (4/3 of their bytes)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PROMPT_CHARS = 4000
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


class FieldError(InvalidArgumentError):
    """A request field is missing, malformed or out of range; `param` names it, `code` is OpenAI-style (HTTP 400)."""

    status = 400

    def __init__(self, param: str | None, what: str, *, accepted: str | None = None, fix: str | None = None,
                 code: str = "invalid_value"):
        self.param, self.code = param, code
        super().__init__(what, accepted=accepted, fix=fix)


class BodyError(FieldError):
    """The body itself is unusable: not JSON, too deep, an integer too long, not an object, too large (400/413),
    or not sent in time (408)."""

    def __init__(self, what: str, *, status: int = 400, accepted: str | None = None, fix: str | None = None,
                 code: str = "invalid_json"):
        super().__init__(None, what, accepted=accepted, fix=fix, code=code)
        self.status = status


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
    return BodyError(f"the request body is {size} bytes", status=413, accepted=f"at most {limit} bytes", fix=fix,
                     code="body_too_large")


MAX_JSON_DEPTH = 16  # the bodies are flat: an object of scalars (and short lists); deeper is not a request
MAX_INT_DIGITS = 40  # 2^64 has 20 digits; Python refuses past 4300 with a message about its own limit
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included (unrolled: no backtracking)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings, found without recursion (a recursive parser fed 60 KB of
    '[' overflows the stack before it can refuse): strings removed by one regex, then a running sum."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.zeros(bare.shape, np.int32)
    steps[(bare == ord("[")) | (bare == ord("{"))] = 1
    steps[(bare == ord("]")) | (bare == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BodyError(f"a JSON integer has {len(text.lstrip('-'))} digits", accepted=f"integers of at most "
                        f"{MAX_INT_DIGITS} digits (seeds are in 0..2^64-1)", fix='e.g. "seed": 42',
                        code="integer_too_long")
    return int(text)


def parse_body(raw: bytes, limit: int = MAX_BODY_BYTES) -> dict:
    """The JSON object in `raw`: size, nesting depth and integer lengths bounded before or while parsing."""
    if len(raw) > limit:
        raise too_large(len(raw), limit)
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise BodyError(f"the request body nests {depth} levels deep", accepted=f"at most {MAX_JSON_DEPTH} "
                        "(a request is a flat JSON object)", fix='send e.g. {"prompt": "a red fox"}',
                        code="json_too_deep")
    try:
        body = json.loads(raw, parse_int=_bounded_int)
    except BodyError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BodyError(f"the request body is not valid JSON ({exc})", accepted="a JSON object",
                        fix='send e.g. {"prompt": "a red fox", "size": "1024x1024"}') from None
    if not isinstance(body, dict):
        raise BodyError(f"the request body is a JSON {type(body).__name__}", accepted="a JSON object",
                        fix='send e.g. {"prompt": "a red fox"}')
    return body


# OpenAI's optional fields (openai_options.py): ignored ones are named in a response header, mapped ones read there
OPENAI_IGNORED = ("model", "user", "style", "moderation", "input_fidelity", "safety_identifier", "complexity")
OPENAI_MAPPED = ("quality", "output_format", "output_compression", "background", "stream", "partial_images")
QUALITY_STEPS = {"low": 12, "medium": 25, "standard": 25, "high": 50, "hd": 50, "xhigh": 75, "max": 100}  # "auto":
# the server's --default-steps; capped at Limits.max_steps
MAX_SEED = 2 ** 64 - 1  # every seed names its own noise (runtime/seeding.py)
FIELDS = ("prompt", "negative_prompt", "n", "size", "response_format", "seed", "steps", "guidance")


def to_request(body: dict, limits: Limits) -> Request:
    """The validated runtime Request for `body`, or a FieldError naming the first bad field."""
    _no_unknown(body, FIELDS + OPENAI_IGNORED + OPENAI_MAPPED)
    prompt = _text(body, "prompt", required=True)
    negative = _text(body, "negative_prompt", required=False)
    n = _integer(body, "n", 1, 1, limits.max_n)
    steps = _steps(body, limits)
    seed = _integer(body, "seed", None, 0, MAX_SEED)
    guidance = _guidance(body, limits.default_guidance)
    size = body.get("size")
    width, height = _size(limits.default_size if size in (None, "auto") else size, limits)
    _response_format(body)
    return make_request(prompt, negative, seed=new_seed() if seed is None else seed,
                        steps=steps, guidance=guidance, height=height, width=width, num_images=n)


def new_seed() -> int:
    """A random seed for a request that gave none (31 bits: it also fits clients that keep seeds in an int32)."""
    return secrets.randbelow(2 ** 31)


def _steps(body: dict, limits: Limits) -> int:
    """`steps`, else `quality`'s preset (QUALITY_STEPS), else the server's default."""
    quality = _choice(body, "quality", "auto", ("auto", *QUALITY_STEPS))
    default = limits.default_steps if quality == "auto" else min(QUALITY_STEPS[quality], limits.max_steps)
    return _integer(body, "steps", default, 1, limits.max_steps)


EDIT_FIELDS = ("prompt", "image", "mask", "outpaint", "strength", "negative_prompt", "n", "response_format", "seed",
               "steps", "guidance", "size")
INPAINT_GUIDANCE = 4.0  # tasks.inpaint's default (the official inpainting pipeline's); image to image: 3.0


def to_edit(body: dict, limits: Limits) -> tuple[Request, "tasks.TaskInputs"]:
    """The Request and task inputs for an edits `body`: a `mask` -> inpainting, `outpaint` -> outpainting,
    neither -> image to image with `strength`; or a FieldError naming the first bad field."""
    _no_unknown(body, EDIT_FIELDS + OPENAI_IGNORED + OPENAI_MAPPED)
    prompt = _text(body, "prompt", required=True)
    negative = _text(body, "negative_prompt", required=False)
    n = _integer(body, "n", 1, 1, limits.max_n)
    steps = _steps(body, limits)
    seed = _integer(body, "seed", None, 0, MAX_SEED)
    _response_format(body)
    if body.get("mask") is not None and body.get("outpaint") is not None:
        raise FieldError("outpaint", "both mask and outpaint were given",
                         accepted="mask (inpainting) or outpaint (outpainting), or neither (image to image)",
                         fix="drop outpaint to repaint the mask's edit area, or drop mask to extend the image")
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
    _edit_size(body, inputs)
    request = _field("prompt", tasks.task_request, inputs, prompt, negative,
                     seed=new_seed() if seed is None else seed, steps=steps, guidance=guidance, num_images=n)
    return request, inputs


def _edit_size(body: dict, inputs) -> None:
    """OpenAI clients may send `size`: "auto" or the output's own size are accepted (it is the image's, or the
    outpainted canvas'); anything else is refused rather than silently not honoured."""
    size = body.get("size")
    height, width = (int(side) for side in inputs.pixels.shape[-2:])
    match = SIZE_PATTERN.match(size) if isinstance(size, str) else None
    if size is None or size == "auto" or (match and (int(match[1]), int(match[2])) == (width, height)):
        return
    raise FieldError("size", f"size={_show(size)} for a {width}x{height} output", accepted=f'"auto" or '
                     f'"{width}x{height}" (edits keep the image\'s size, or the outpainted canvas\')',
                     fix="omit size, or resize the image before sending it")


def _inpaint_inputs(body: dict, image, limits: Limits) -> "tasks.InpaintInputs":
    if body.get("mask") is not None:
        mask = _picture(body, "mask", limits)
        if mask.size != image.size:
            raise FieldError("mask", f"mask is {mask.size[0]}x{mask.size[1]} px but the image is "
                             f"{image.size[0]}x{image.size[1]}", accepted="a mask of the image's size",
                             fix="resize the mask to the image (nearest neighbour keeps it binary)")
        try:
            inputs = tasks.inpaint_inputs(image, edit_mask(mask))
        except InvalidArgumentError as exc:
            if "repaints nothing" not in exc.what:  # the all-keep mask gets its own code, below
                raise FieldError("mask", exc.what, accepted=exc.accepted, fix=exc.fix) from None
            inputs = None
        if inputs is None or not bool(inputs.user_mask.any()):
            raise FieldError("mask", "the mask marks nothing to edit (every pixel is kept)",
                             accepted="a mask with an edit area: transparent pixels (alpha 0, OpenAI's convention)"
                             " or, without alpha, white pixels", fix="mark the area to repaint, or use "
                             "image to image (no mask) to change the whole picture", code="mask_keeps_everything")
        return inputs
    margins = body["outpaint"]
    if not isinstance(margins, str):
        raise FieldError("outpaint", f"outpaint={_show(margins)}", accepted='"SIDE=PIXELS,..." with SIDE in left, '
                         "right, top, bottom", fix='e.g. "outpaint": "left=128,right=128"')
    inputs = _field("outpaint", tasks.inpaint_inputs, image, outpaint=margins, max_side=limits.max_side)
    height, width = inputs.pixels.shape[-2:]
    if max(height, width) > limits.max_side:
        raise FieldError("outpaint", f"outpaint={_show(margins)} grows the image to {width}x{height} px",
                         accepted=f"a canvas with sides up to {limits.max_side}", fix="use smaller margins")
    return inputs


def edit_mask(mask):
    """The mask in this project's convention (white = edit). A mask whose alpha channel is not fully opaque follows
    OpenAI's: the transparent pixels (alpha < 128) are the area to edit; without alpha, or fully opaque, white is."""
    from PIL import Image

    has_alpha = mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info)
    if not has_alpha:
        return mask
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    if alpha.min(initial=255) == 255:
        return mask.convert("RGB")
    return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), mode="L")


def _picture(body: dict, name: str, limits: Limits):
    """A base64 PNG/JPEG/WebP (optionally a data: URL) -> a decoded PIL image whose sides this service accepts.
    The sides are read from the header and checked before any pixel is decoded."""
    from PIL import Image

    value = body.get(name)
    accepted = (f"a {'/'.join(IMAGE_FORMATS)} file (multipart upload), or its base64 in JSON (a "
                "data:image/...;base64, prefix is accepted)")
    if not isinstance(value, (str, bytes)) or not value:
        what = f"{name} is missing" if value is None else f"{name}={_show(value)}"
        raise FieldError(name, what, accepted=accepted, fix=f'send "{name}": base64 of the file\'s bytes',
                         code="missing_required_parameter" if value is None else "invalid_value")
    if isinstance(value, str) and value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise FieldError(name, f"{name} is a data URL without ;base64", accepted=accepted,
                             fix="encode the file as base64: data:image/png;base64,...")
    try:
        raw = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
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
    """`fn(...)`, with its InvalidArgumentError re-raised as a FieldError naming `param` (HTTP 400)."""
    try:
        return fn(*args, **kwargs)
    except InvalidArgumentError as exc:
        raise FieldError(param, exc.what, accepted=exc.accepted, fix=exc.fix) from None


def _no_unknown(body: dict, fields: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise FieldError(unknown[0], f"unknown field {unknown[0]!r}", accepted=", ".join(fields),
                         fix=f"remove {unknown[0]!r}", code="unknown_parameter")


def _response_format(body: dict) -> None:
    response_format = body.get("response_format")
    if response_format not in (None, "b64_json"):
        raise FieldError("response_format", f"response_format={response_format!r}", accepted='"b64_json"',
                         fix="omit it or send \"b64_json\" (this server returns images inline, not URLs)")


def _text(body: dict, name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):  # "" is a prompt, as in diffusers and everywhere in k3trt (docs/reliability.md)
        what = f"{name} is missing" if value is None else f"{name}={_show(value)}"
        raise FieldError(name, what, accepted="a string", fix=f'send "{name}": "a red fox in the snow"',
                         code="missing_required_parameter" if value is None else "invalid_value")
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


def _choice(body: dict, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise FieldError(name, f"{name}={_show(value)}", accepted=", ".join(f'"{c}"' for c in choices),
                         fix=f'e.g. "{name}": "{default}" (or omit it)')
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
