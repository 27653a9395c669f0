"""OpenAI's multipart/form-data edits body (what `client.images.edit` sends) -> the dict `schema.to_edit` reads.

Parsed by Starlette's MultiPartParser (python-multipart underneath, FastAPI's own form dependency) from the bytes
the HTTP layer already read under its size cap, so an upload is bounded the same way as a JSON body. Files
become bytes (`schema._picture` decodes them), text fields become the JSON types `to_edit` checks: integers and
numbers where the field is numeric, booleans for `stream`; a value that does not convert stays a string and is
refused by the field's own check, naming it. The SDK sends a list of images as `image[]`; one image is served.
"""
from __future__ import annotations

from k3trt.runtime.serving.schema import MAX_INT_DIGITS, BodyError, FieldError

INTEGER_FIELDS = ("n", "seed", "steps", "output_compression", "partial_images")
NUMBER_FIELDS = ("guidance", "strength")
BOOLEAN_FIELDS = ("stream",)
FILE_FIELDS = ("image", "mask")
MAX_FORM_FIELDS = 64  # the edits form has under 25 fields
MAX_FORM_FILES = 4


def is_multipart(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "multipart/form-data"


async def parse_form(raw: bytes, headers) -> dict:
    """The form in `raw` (a complete body) as a dict of JSON-like values; a BodyError if it is not a form."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay():
        yield raw
        yield b""

    parser = MultiPartParser(headers, replay(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BodyError(f"the multipart body could not be parsed ({exc.message})", accepted="multipart/form-data "
                        "as the OpenAI SDK sends it, or a JSON object", fix="send the image as a file part named "
                        "image (and mask), the other fields as text parts", code="invalid_multipart") from None
    body: dict = {}
    try:
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if name in body:
                raise FieldError(name, f"{name} was sent more than once", accepted=f"one {name}",
                                 fix=f"send a single {name} part (this service edits one image per request)")
            body[name] = await value.read() if isinstance(value, UploadFile) else _typed(name, value)
    finally:
        await form.close()
    return body


def _typed(name: str, text: str):
    """A text part as the JSON value a JSON client would have sent; unchanged when it does not convert."""
    stripped = text.strip()
    if name in INTEGER_FIELDS and stripped.lstrip("-").isdigit():
        if len(stripped.lstrip("-")) > MAX_INT_DIGITS:
            raise FieldError(name, f"{name} has {len(stripped)} digits", accepted=f"at most {MAX_INT_DIGITS}",
                             fix=f"send a smaller {name}", code="integer_too_long")
        return int(stripped)
    if name in NUMBER_FIELDS and len(stripped) <= 64:
        try:
            return float(stripped)
        except ValueError:
            return text
    if name in BOOLEAN_FIELDS and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return text
