"""Input images and masks for image-to-image, inpainting and outpainting, checked before any model runs.

Conventions (docs/tasks.md): images become float tensors (1, 3, H, W) in [-1, 1] (`2 x - 1` of [0, 1] pixels,
as diffusers' VaeImageProcessor and the official `to_tensor(image) * 2 - 1`); a user mask is H x W with 1 where
the image is to be repainted (the official README's convention), binarized at 0.5.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from k3trt.contract.cards import PIXEL_MULTIPLE  # noqa: F401  (image sides are multiples of it; written once, on the cards)
from k3trt.contract.errors import InvalidArgumentError

GREY_BAND = (0.1, 0.9)  # mask values strictly inside this band are "grey"
MAX_GREY_FRACTION = 0.05  # anti-aliased edges are fine; a photo or a soft matte is not a mask
SIDES = ("left", "right", "top", "bottom")


def decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a damaged or hostile file: OSError (truncated data), SyntaxError (a broken PNG
    chunk), ValueError, EOFError, UnidentifiedImageError, DecompressionBombError (over twice its pixel limit)."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open(value, what: str):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        array = value.astype(np.float32)
        if array.max(initial=0) > 1.0:
            array = array / 255.0
        return array
    path = Path(value)
    if not path.is_file():
        raise InvalidArgumentError(f"{what} {str(path)!r} does not exist", accepted="a PNG/JPEG/WebP file",
                                   fix=f"check the {what} path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except decode_errors() as exc:
        raise InvalidArgumentError(f"{what} {str(path)!r} is not an image ({exc.__class__.__name__})",
                                   accepted="a file Pillow can read (PNG, JPEG, WebP, ...)",
                                   fix=f"pass a real image as the {what}") from None


def check_size(height: int, width: int, what: str = "image") -> None:
    bad = [f"{name} {v}" for name, v in (("height", height), ("width", width)) if v % PIXEL_MULTIPLE or v <= 0]
    if bad:
        fit = (max(PIXEL_MULTIPLE, height // PIXEL_MULTIPLE * PIXEL_MULTIPLE),
               max(PIXEL_MULTIPLE, width // PIXEL_MULTIPLE * PIXEL_MULTIPLE))
        raise InvalidArgumentError(f"{what} is {width}x{height} px ({', '.join(bad)} not a multiple of "
                                   f"{PIXEL_MULTIPLE})", accepted=f"width and height multiples of {PIXEL_MULTIPLE}",
                                   fix=f"resize or crop it, e.g. to {fit[1]}x{fit[0]}")


def load_image(value) -> torch.Tensor:
    """A path, PIL image or (H, W, 3) array -> (1, 3, H, W) float32 in [-1, 1]."""
    image = _open(value, "image")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim != 3 or array.shape[-1] != 3:
            raise InvalidArgumentError(f"image array of shape {array.shape}", accepted="(H, W, 3)")
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    check_size(array.shape[0], array.shape[1])
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] * 2.0 - 1.0


def load_mask(value, size: tuple[int, int]) -> torch.Tensor:
    """A path, PIL image or (H, W) array with 1 (white) where to repaint -> (1, 1, H, W) float32 0/1."""
    mask = _open(value, "mask")
    if isinstance(mask, np.ndarray):
        array = mask
    else:
        array = np.asarray(mask.convert("RGB") if mask.mode not in ("L", "1", "I", "F") else mask, np.float32)
        array = array / (255.0 if mask.mode in ("L", "RGB", "RGBA", "P", "LA") else max(1.0, array.max()))
    if array.ndim == 3:
        if array.shape[-1] == 1 or np.ptp(array, axis=-1).max(initial=0) == 0:
            array = array[..., 0]
        else:
            raise InvalidArgumentError("the mask has colour (its channels differ)",
                                       accepted="a single-channel (greyscale or black/white) image",
                                       fix="save the mask as greyscale: white = repaint, black = keep")
    if array.shape != tuple(size):
        raise InvalidArgumentError(f"mask is {array.shape[1]}x{array.shape[0]} px but the image is "
                                   f"{size[1]}x{size[0]}", accepted="a mask of the image's size",
                                   fix="resize the mask to the image (nearest neighbour keeps it binary)")
    grey = float(((array > GREY_BAND[0]) & (array < GREY_BAND[1])).mean())
    if grey > MAX_GREY_FRACTION:
        raise InvalidArgumentError(f"{grey:.1%} of the mask's pixels are grey (between {GREY_BAND[0]} and "
                                   f"{GREY_BAND[1]})", accepted=f"a binary mask (at most {MAX_GREY_FRACTION:.0%} "
                                   "grey pixels, e.g. anti-aliased edges)",
                                   fix="threshold the mask: white = repaint, black = keep")
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def parse_margins(text: str) -> dict[str, int]:
    """`left=128,right=256` -> {"left": 128, "right": 256, "top": 0, "bottom": 0}, each a multiple of 64."""
    margins = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        match = re.fullmatch(r"(left|right|top|bottom)=(\d+)", part)
        if not match:
            raise InvalidArgumentError(f"outpaint margin {part!r}", accepted="SIDE=PIXELS with SIDE in "
                                       "left, right, top, bottom", fix="e.g. --outpaint left=128,right=256")
        margins[match[1]] = int(match[2])
    bad = {k: v for k, v in margins.items() if v % PIXEL_MULTIPLE}
    if bad:
        side, value = next(iter(bad.items()))
        raise InvalidArgumentError(f"outpaint margin {side}={value} is not a multiple of {PIXEL_MULTIPLE} px "
                                   f"(8 latent cells)", accepted=f"multiples of {PIXEL_MULTIPLE}",
                                   fix=f"use {side}={-(-value // PIXEL_MULTIPLE) * PIXEL_MULTIPLE}")
    if not any(margins.values()):
        raise InvalidArgumentError(f"outpaint margins {text!r} add nothing", accepted="at least one margin > 0",
                                   fix="e.g. --outpaint left=128")
    return margins


def outpaint_canvas(image: torch.Tensor, margins: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image on a canvas grown by `margins` (new area 0, mid grey) and the user mask (1 on the new area)."""
    _, _, h, w = image.shape
    top, left = margins["top"], margins["left"]
    height, width = h + top + margins["bottom"], w + left + margins["right"]
    canvas = torch.zeros(1, 3, height, width, dtype=image.dtype)
    canvas[:, :, top:top + h, left:left + w] = image
    mask = torch.ones(1, 1, height, width, dtype=image.dtype)
    mask[:, :, top:top + h, left:left + w] = 0
    return canvas, mask


MAX_SUGGESTED_STEPS = 1000  # a fix that needs more steps than this is no fix


def check_strength(strength, steps: int) -> int:
    """diffusers' get_timesteps: int(steps * strength) steps run; 0 < strength <= 1 and at least one step."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0.0 < float(strength) <= 1.0:
        raise InvalidArgumentError(f"strength={strength!r}", accepted="a number in (0, 1]",
                                   fix="e.g. --strength 0.6 (1.0 ignores the input image)")
    run = min(int(steps * strength), steps)
    if run < 1:
        needed = 1 / strength  # inf for a subnormal strength: then only a larger strength helps
        more_steps = f" or --steps {math.ceil(needed)}" if needed <= MAX_SUGGESTED_STEPS else ""
        raise InvalidArgumentError(f"strength={strength} with steps={steps} runs int({steps} x {strength}) = 0 steps",
                                   accepted=f"strength >= {1 / steps:.3g} for {steps} steps",
                                   fix=f"raise --strength (e.g. --strength {max(1 / steps, 0.3):.3g}){more_steps}")
    return run
