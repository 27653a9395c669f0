"""The request and response bodies as pydantic models, for /openapi.json only.

The routes validate by hand (schema.py: each refusal names the field, what is accepted and the fix, in OpenAI's
error envelope), so these models describe the contract for clients and generators; a test checks that every
field they list is one the parser accepts.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

Quality = Literal["auto", "low", "medium", "standard", "high", "hd", "xhigh", "max"]
Format = Literal["png", "jpeg", "webp"]


class _Common(BaseModel):
    prompt: str = Field(description="what to draw (at most 4000 characters; the model reads 128 tokens)")
    negative_prompt: Optional[str] = None
    n: int = Field(1, ge=1, description="images; image i has seed + i, and that seed alone reproduces it")
    seed: Optional[int] = Field(None, ge=0, le=2 ** 64 - 1, description="random when omitted")
    steps: Optional[int] = Field(None, ge=1, description="default: quality's preset, else --default-steps")
    guidance: Optional[float] = Field(None, ge=0, le=100)
    quality: Quality = Field("auto", description="a steps preset: low 12, medium/standard 25, high/hd 50, xhigh 75,"
                             " max 100, auto = --default-steps")
    output_format: Format = "png"
    output_compression: int = Field(100, ge=0, le=100, description="JPEG/WebP encoder quality")
    background: Literal["auto", "opaque"] = "auto"
    stream: bool = Field(False, description="server-sent events: progress per step, then the images")
    partial_images: int = Field(0, ge=0, le=3, description="accepted; previews are not produced (header says so)")
    response_format: Literal["b64_json"] = "b64_json"
    model: Optional[str] = Field(None, description='"kandinsky-3" (default) or "kandinsky-3+NAME" for a LoRA adapter '
                                 '(GET /v1/models lists them)')
    user: Optional[str] = None


class GenerationBody(_Common):
    size: str = Field("auto", description='"WxH", multiples of 64 in the artifacts\' range; "auto": the default')


class EditBody(_Common):
    image: str = Field(description="PNG/JPEG/WebP: a file part (multipart) or base64 (JSON)")
    mask: Optional[str] = Field(None, description="transparent = edit when it has alpha, else white = edit")
    outpaint: Optional[str] = Field(None, description='"left=128,right=64": grow the canvas and paint the margins')
    strength: Optional[float] = Field(None, gt=0, le=1, description="image to image only (no mask, no outpaint)")
    size: Optional[str] = Field(None, description='"auto" or the output\'s own size')


class VariationBody(_Common):
    image: str = Field(description="PNG/JPEG/WebP: a file part (multipart) or base64 (JSON)")
    strength: Optional[float] = Field(None, gt=0, le=1, description="how much of the schedule runs (default 0.3)")
    size: Optional[str] = Field(None, description='"auto" or the image\'s own size')


class ImageItem(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: Optional[str] = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageItem]
    background: str
    output_format: Format
    quality: str
    size: str


class ErrorObject(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorObject


def _json(model) -> dict:
    return model.model_json_schema()  # nested models stay under the schema's own $defs (OpenAPI 3.1 allows it)


def _responses() -> dict:
    error = {"content": {"application/json": {"schema": _json(ErrorResponse)}}}
    return {"200": {"description": "the images (or, with stream, text/event-stream)",
                    "content": {"application/json": {"schema": _json(ImagesResponse)}}},
            **{str(code): {"description": text, **error} for code, text in (
                (400, "bad input"), (401, "API key"), (413, "body too large"), (429, "queue full, Retry-After"),
                (503, "not ready, draining or failed"), (504, "deadline passed"))}}


def _describe(*bodies: tuple[str, type]) -> dict:
    return {"requestBody": {"required": True, "content": {kind: {"schema": _json(model)} for kind, model in bodies}},
            "responses": _responses()}


describe_routes = {"generations": _describe(("application/json", GenerationBody)),
                   "edits": _describe(("multipart/form-data", EditBody), ("application/json", EditBody)),
                   "variations": _describe(("multipart/form-data", VariationBody), ("application/json", VariationBody))}
