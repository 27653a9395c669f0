"""OpenAI's optional Images API fields: each is either mapped onto this service or accepted and reported as ignored.

Mapped (docs/serving.md):
- `output_format` png | jpeg | webp, with `output_compression` 0..100 as the JPEG/WebP encoder's quality
  (100, OpenAI's default, loses least); PNG is lossless and ignores it.
- `size: "auto"` = the server's default size (`--default-resolution`); on edits the image's own size.
- `quality` = a steps preset (QUALITY_STEPS) unless `steps` is given; "auto" = the server's `--default-steps`.
- `background`: "auto" and "opaque" are what the model makes; "transparent" is refused (no alpha output).
- `stream` (server-sent events) and `partial_images` (0..3 previews) are read by the HTTP layer.
- `model`: "kandinsky-3" (the base) or "kandinsky-3+NAME" (a LoRA adapter, adapters.py), read by the HTTP layer.
Ignored, named in the `X-K3TRT-Ignored-Fields` response header: `style`, `moderation`, `input_fidelity` and `user`.
"""
from __future__ import annotations

import dataclasses
import io

from k3trt.runtime.serving.schema import OPENAI_IGNORED as IGNORED
from k3trt.runtime.serving.schema import QUALITY_STEPS, FieldError, _choice, _show

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images
IGNORED_HEADER = "X-K3TRT-Ignored-Fields"


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """How the images go back: file format, encoder quality, streaming, and the OpenAI fields that were ignored."""
    output_format: str = "png"
    compression: int = 100
    stream: bool = False
    partial_images: int = 0
    quality: str = "auto"
    ignored: tuple[str, ...] = ()

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.output_format]


def output_options(body: dict) -> OutputOptions:
    """The checked output fields of `body` (either route); a FieldError names the first bad one."""
    output_format = _choice(body, "output_format", "png", tuple(OUTPUT_FORMATS))
    compression = body.get("output_compression", 100)
    if compression is None:
        compression = 100
    if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
        raise FieldError("output_compression", f"output_compression={_show(compression)}",
                         accepted="an integer in 0..100 (the JPEG/WebP encoder's quality; 100 loses least)",
                         fix='e.g. "output_compression": 90')
    background = _choice(body, "background", "auto", ("auto", "opaque", "transparent"))
    if background == "transparent":
        raise FieldError("background", 'background="transparent"', accepted='"auto" or "opaque"',
                         fix="omit background: Kandinsky 3 makes opaque images (no alpha channel)")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise FieldError("stream", f"stream={_show(stream)}", accepted="true or false", fix='e.g. "stream": true')
    partial = body.get("partial_images", 0)
    if partial is None:
        partial = 0
    if isinstance(partial, bool) or not isinstance(partial, int) or not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise FieldError("partial_images", f"partial_images={_show(partial)}",
                         accepted=f"an integer in 0..{MAX_PARTIAL_IMAGES}", fix='e.g. "partial_images": 1')
    quality = _choice(body, "quality", "auto", ("auto", *QUALITY_STEPS))
    ignored = tuple(name for name in IGNORED if body.get(name) is not None and name != "model")
    return OutputOptions(output_format, compression, stream, partial, quality, ignored)


def encode_image(image, options: OutputOptions) -> bytes:
    """A PIL image as the requested file format (PNG lossless; JPEG/WebP at `output_compression` quality)."""
    buffer = io.BytesIO()
    if options.output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=OUTPUT_FORMATS[options.output_format], quality=options.compression)
    return buffer.getvalue()
