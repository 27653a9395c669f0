"""The OpenAI Images API request body, validated by hand into a runtime Request.

By hand rather than a pydantic model because every rejection must name the field, what is accepted and the fix
in this project's error shape, before any work starts; the rules are few and each is tested.
Body: {"prompt", "n", "size": "WxH", "response_format": "b64_json"} plus this model's "negative_prompt",
"seed", "steps", "guidance"; "model" and "user" (sent by OpenAI clients) are accepted and ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets

from ..cards import PIXEL_MULTIPLE
from ..errors import InvalidArgumentError
from ..pipeline import Request, make_request

MAX_BODY_BYTES = 64 * 1024
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


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise BodyError(f"the request body is {len(raw)} bytes", status=413,
                        accepted=f"at most {MAX_BODY_BYTES} bytes", fix="shorten the prompt")
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
    unknown = sorted(set(body) - set(FIELDS) - set(IGNORED_FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown field {unknown[0]!r}", accepted=", ".join(FIELDS),
                         fix=f"remove {unknown[0]!r}")
    prompt = _text(body, "prompt", required=True)
    negative = _text(body, "negative_prompt", required=False)
    n = _integer(body, "n", 1, 1, limits.max_n)
    steps = _integer(body, "steps", limits.default_steps, 1, limits.max_steps)
    seed = _integer(body, "seed", None, 0, 2 ** 63 - 1)
    guidance = _guidance(body, limits.default_guidance)
    width, height = _size(body.get("size", limits.default_size), limits)
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise FieldError("response_format", f"response_format={response_format!r}", accepted='"b64_json"',
                         fix="omit it or send \"b64_json\" (this server returns images inline, not URLs)")
    return make_request(prompt, negative, seed=secrets.randbelow(2 ** 31) if seed is None else seed,
                        steps=steps, guidance=guidance, height=height, width=width, num_images=n)


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
