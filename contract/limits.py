"""What an artifact directory accepts, stated in the user's units (pixels, images), checked before any work.

The manifest records each component's dynamic axes in latent units (U-Net height 8..256, a multiple of 8);
a user asks for pixels. These helpers translate, so an out-of-range request names pixel sizes and image
counts, and the default image size is one the artifacts were made for.
"""
from __future__ import annotations

import dataclasses

from k3trt.contract.errors import InvalidArgumentError, ShapeError
from k3trt.contract.manifest import Manifest

KANDINSKY3_NATIVE_SIZE = 1024
PIXEL_MULTIPLE = 64  # diffusers rounds height and width up to a multiple of 64


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    min_px: int
    max_px: int
    multiple_px: int
    max_images: int  # per call, guidance doubling the U-Net batch included

    def describe(self) -> str:
        return f"{self.min_px}..{self.max_px} px in steps of {self.multiple_px}"


def _axis(manifest: Manifest, component: str, name: str, default: tuple[int, int]) -> tuple[int, int]:
    if not manifest.has_onnx(component):
        return default
    return tuple(manifest.onnx(component).axes.get(name, default))


def image_limits(manifest: Manifest, *, guided: bool = True) -> ImageLimits:
    scale = int(manifest.data.get("pipeline", {}).get("movq_scale_factor", 8))
    lows, highs = [], []
    for component in ("unet", "movq_decoder"):
        for axis in ("height", "width"):
            lo, hi = _axis(manifest, component, axis, (1, 1 << 13))
            lows.append(lo)
            highs.append(hi)
    multiple = max(PIXEL_MULTIPLE, scale * 8)
    min_px = -(-max(lows) * scale // multiple) * multiple
    max_px = min(highs) * scale // multiple * multiple
    unet_batch = _axis(manifest, "unet", "batch", (1, 64))[1]
    movq_batch = _axis(manifest, "movq_decoder", "batch", (1, 64))[1]
    return ImageLimits(min_px, max_px, multiple, min(unet_batch // (2 if guided else 1), movq_batch))


def default_size(manifest: Manifest) -> int:
    """The size the artifacts were made for: the preset's native size recorded at export, else Kandinsky 3's
    1024 (within what the artifacts allow)."""
    native = manifest.data.get("pipeline", {}).get("native_size")
    size = native if isinstance(native, int) and native > 0 else KANDINSKY3_NATIVE_SIZE
    limits = image_limits(manifest)
    return min(max(size, limits.min_px), max(limits.max_px, limits.min_px))


def check_image_request(manifest: Manifest, *, height: int, width: int, images: int, guided: bool) -> None:
    """Pixel sizes (after rounding up to 64) and the image count against the artifacts' ranges."""
    limits = image_limits(manifest, guided=guided)
    for name, value in (("height", height), ("width", width)):
        if not limits.min_px <= value <= limits.max_px:
            raise ShapeError(
                f"{name} {value} px is outside what the artifacts in {str(manifest.root)!r} allow",
                accepted=limits.describe() + " (other sizes round up to a multiple of 64)",
                fix=f"e.g. --resolution {default_size(manifest)}x{default_size(manifest)} (height=, width= in the "
                    "API), or re-export for that size")
    if images > limits.max_images:
        raise InvalidArgumentError(
            f"{images} images in one call", accepted=f"at most {limits.max_images} (prompts x --batch"
            f"{', doubled by guidance' if guided else ''})", fix="lower --batch (num_images in the API) or split the "
            "prompts")
