"""Input images and masks for image-to-image, inpainting and outpainting, checked before any model runs.

Conventions (docs/tasks.md): images become float tensors (1, 3, H, W) in [-1, 1] (`2 x - 1` of [0, 1] pixels,
as diffusers' VaeImageProcessor and the official `to_tensor(image) * 2 - 1`); a user mask is H x W with 1 where
the image is to be repainted (the official README's convention), binarized at 0.5.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
from k3trt.contract.arguments import check_path
from k3trt.contract.cards import PIXEL_MULTIPLE, card
from k3trt.contract.errors import InvalidArgumentError

GREY_BAND = (0.1, 0.9)  # mask values strictly inside this band are "grey"
MAX_GREY_FRACTION = 0.05  # anti-aliased edges are fine; a photo or a soft matte is not a mask
SIDES = ("left", "right", "top", "bottom")


def decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a damaged or hostile file: OSError (truncated data), SyntaxError (a broken PNG
    chunk), ValueError, EOFError, UnidentifiedImageError, DecompressionBombError (over twice its pixel limit)."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# The largest image side any Kandinsky 3 artifact accepts (the MoVQ encoder card's pixel axis): an image or a
# canvas beyond it is refused from its header or its numbers, before a pixel is decoded or allocated. A pipeline
# passes its own artifacts' (smaller) limit.
MAX_IMAGE_SIDE = card("movq_encoder").axes["image_height"].max
MAX_MARGIN_DIGITS = 6  # a margin is at most MAX_IMAGE_SIDE px; longer digit strings are refused as text


def _open(value, what: str, max_side: int):
    """A PIL image (header read, pixels not yet decoded unless it came decoded) or a checked float array."""
    from PIL import Image

    if isinstance(value, Image.Image):
        _check_sides(value.size[1], value.size[0], what, max_side)
        return value
    if isinstance(value, np.ndarray):
        return _check_array(value, what, max_side)
    if not isinstance(value, (str, os.PathLike)) or isinstance(os.fspath(value), bytes):
        raise InvalidArgumentError(f"{what} is a {type(value).__name__}",
                                   accepted="a file path (str or pathlib.Path), a PIL image, or a numpy array",
                                   fix=f"pass the {what} as a path or a PIL image (for encoded bytes: "
                                       "PIL.Image.open(io.BytesIO(data)))")
    path = check_path(what, value)
    if not path.is_file():
        raise InvalidArgumentError(f"{what} {str(path)!r} does not exist", accepted="a PNG/JPEG/WebP file",
                                   fix=f"check the {what} path")
    try:
        with Image.open(path) as image:
            _check_sides(image.size[1], image.size[0], f"{what} {str(path)!r}", max_side)  # the header only
            image.load()
            return image.copy()
    except InvalidArgumentError:
        raise  # the side check's own refusal (it is a ValueError, which decode_errors() would rewrite)
    except Image.DecompressionBombError as exc:  # Pillow refuses from the header, before our side check
        raise InvalidArgumentError(f"{what} {str(path)!r} is far larger than any image k3trt accepts ({exc})",
                                   accepted=f"sides up to {max_side} px (what the artifacts accept)",
                                   fix=f"resize it to at most {max_side} px per side") from None
    except decode_errors() as exc:
        raise InvalidArgumentError(f"{what} {str(path)!r} is not an image ({exc.__class__.__name__})",
                                   accepted="a file Pillow can read (PNG, JPEG, WebP, ...)",
                                   fix=f"pass a real image as the {what}") from None


def _check_sides(height: int, width: int, what: str, max_side: int) -> None:
    if max(height, width) > max_side:
        raise InvalidArgumentError(f"{what} is {width}x{height} px", accepted=f"sides up to {max_side} px (what "
                                   "the artifacts accept)", fix=f"resize it to at most {max_side} px per side")


def _check_array(value: np.ndarray, what: str, max_side: int) -> np.ndarray:
    """A real, finite array: uint16 scales by 65535; other numbers are 0..1, or 0..255 when any value is above 1
    (so a uint8 mask of 0/1 stays 0/1); anything else is refused before it is copied."""
    if value.ndim not in (2, 3) or value.size == 0:
        raise InvalidArgumentError(f"{what} array of shape {value.shape}", accepted="(H, W, 3) for an image, "
                                   "(H, W) for a mask", fix="pass one image, channels last")
    _check_sides(value.shape[0], value.shape[1], f"{what} array", max_side)
    if value.dtype == np.bool_:
        return value.astype(np.float32)
    if value.dtype.kind not in "uif":
        raise InvalidArgumentError(f"{what} array of dtype {value.dtype}", accepted="bool, integer or float pixels",
                                   fix="e.g. np.asarray(pil_image) (uint8)")
    if value.dtype == np.uint16:
        return value.astype(np.float32) / 65535.0
    array = value.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidArgumentError(f"{what} array holds NaN or Inf", accepted="finite pixel values",
                                   fix="replace them (np.nan_to_num) or fix the code that made the array")
    if array.max(initial=0) > 1.0:
        array = array / 255.0
    if array.min(initial=0) < 0.0 or array.max(initial=0) > 1.0:
        raise InvalidArgumentError(f"{what} array values span {value.min()}..{value.max()}",
                                   accepted="0..1, or 0..255 (uint8), or 0..65535 (uint16)",
                                   fix="scale the pixels into one of those ranges")
    return array


def _pixels(image) -> np.ndarray:
    """A PIL image's pixels as float32 in [0, 1] (H, W) or (H, W, C): 16-bit greyscale scaled by 65535
    (`convert("RGB")` would clip it to white), float images checked for range."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float32)
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise InvalidArgumentError(f"a {image.mode} image with values {array.min():g}..{array.max():g}",
                                       accepted="16-bit pixels (0..65535)", fix="save it as an 8- or 16-bit PNG")
        return array / 65535.0
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all() or array.min(initial=0) < 0 or array.max(initial=0) > 1:
            raise InvalidArgumentError("a floating-point image outside 0..1", accepted="pixels in 0..1",
                                       fix="save it as an 8- or 16-bit PNG")
        return array
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def check_size(height: int, width: int, what: str = "image") -> None:
    bad = [f"{name} {v}" for name, v in (("height", height), ("width", width)) if v % PIXEL_MULTIPLE or v <= 0]
    if bad:
        fit = (max(PIXEL_MULTIPLE, height // PIXEL_MULTIPLE * PIXEL_MULTIPLE),
               max(PIXEL_MULTIPLE, width // PIXEL_MULTIPLE * PIXEL_MULTIPLE))
        raise InvalidArgumentError(f"{what} is {width}x{height} px ({', '.join(bad)} not a multiple of "
                                   f"{PIXEL_MULTIPLE})", accepted=f"width and height multiples of {PIXEL_MULTIPLE}",
                                   fix=f"resize or crop it, e.g. to {fit[1]}x{fit[0]}")


def load_image(value, max_side: int = MAX_IMAGE_SIDE) -> torch.Tensor:
    """A path, PIL image or (H, W, 3) array -> (1, 3, H, W) float32 in [-1, 1]. Sides over `max_side` are
    refused from the file's header, before its pixels are decoded."""
    image = _open(value, "image", max_side)
    array = image if isinstance(image, np.ndarray) else _pixels(image)
    if array.ndim == 2:  # greyscale: the same value in R, G and B (as convert("RGB") does)
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] != 3:
        raise InvalidArgumentError(f"image array of shape {array.shape}", accepted="(H, W, 3) or (H, W)",
                                   fix="drop the alpha channel: array[..., :3]")
    check_size(array.shape[0], array.shape[1])
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] * 2.0 - 1.0


def load_mask(value, size: tuple[int, int]) -> torch.Tensor:
    """A path, PIL image or (H, W) array with 1 (white) where to repaint -> (1, 1, H, W) float32 0/1. A mask of
    another size than the image is refused from its header; one that repaints nothing is refused before work."""
    mask = _open(value, "mask", max(size))
    if not isinstance(mask, np.ndarray) and (mask.size[1], mask.size[0]) != tuple(size):
        _wrong_mask_size(mask.size[1], mask.size[0], size)
    array = mask if isinstance(mask, np.ndarray) else _pixels(mask)
    if array.ndim == 3:
        if array.shape[-1] == 1 or np.ptp(array, axis=-1).max(initial=0) == 0:
            array = array[..., 0]
        else:
            raise InvalidArgumentError("the mask has colour (its channels differ)",
                                       accepted="a single-channel (greyscale or black/white) image",
                                       fix="save the mask as greyscale: white = repaint, black = keep")
    if array.shape != tuple(size):
        _wrong_mask_size(array.shape[0], array.shape[1], size)
    grey = float(((array > GREY_BAND[0]) & (array < GREY_BAND[1])).mean())
    if grey > MAX_GREY_FRACTION:
        raise InvalidArgumentError(f"{grey:.1%} of the mask's pixels are grey (between {GREY_BAND[0]} and "
                                   f"{GREY_BAND[1]})", accepted=f"a binary mask (at most {MAX_GREY_FRACTION:.0%} "
                                   "grey pixels, e.g. anti-aliased edges)",
                                   fix="threshold the mask: white = repaint, black = keep")
    binary = (array >= 0.5).astype(np.float32)
    if not binary.any():
        raise InvalidArgumentError("the mask is all black: it repaints nothing", accepted="a mask with white "
                                   "(repaint) pixels", fix="paint the area to change white (1); black (0) keeps")
    return torch.from_numpy(binary)[None, None]


def _wrong_mask_size(height: int, width: int, size: tuple[int, int]) -> None:
    raise InvalidArgumentError(f"mask is {width}x{height} px but the image is {size[1]}x{size[0]}",
                               accepted="a mask of the image's size",
                               fix="resize the mask to the image (nearest neighbour keeps it binary)")


def parse_margins(text: str) -> dict[str, int]:
    """`left=128,right=256` -> {"left": 128, "right": 256, "top": 0, "bottom": 0}, each a multiple of 64 and
    named once."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"outpaint={text!r}", accepted='"SIDE=PIXELS,..." or a dict of sides',
                                   fix='e.g. outpaint="left=128,right=256" (--outpaint left=128,right=256)')
    margins, named = dict.fromkeys(SIDES, 0), set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(rf"(left|right|top|bottom)=(\d{{1,{MAX_MARGIN_DIGITS}}})", part)
        if not match:
            raise InvalidArgumentError(f"outpaint margin {part[:40]!r}", accepted="SIDE=PIXELS with SIDE in left, "
                                       f"right, top, bottom and at most {MAX_IMAGE_SIDE} px",
                                       fix="e.g. --outpaint left=128,right=256")
        if match[1] in named:
            raise InvalidArgumentError(f"outpaint names {match[1]} twice ({text[:60]!r})", accepted="each side once",
                                       fix=f"give {match[1]} one margin")
        named.add(match[1])
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


def margins_text(outpaint) -> str:
    """The `outpaint` argument as `parse_margins` text: a str as is, a dict of side -> int joined."""
    if isinstance(outpaint, dict):
        bad = [k for k, v in outpaint.items() if not isinstance(k, str) or not isinstance(v, int)
               or isinstance(v, bool)]
        if bad:
            raise InvalidArgumentError(f"outpaint={outpaint!r}", accepted="a dict of side name -> int pixels",
                                       fix='e.g. {"left": 128}')
        return ",".join(f"{k}={v}" for k, v in outpaint.items())
    return outpaint


def check_canvas(height: int, width: int, margins: dict[str, int], max_side: int) -> tuple[int, int]:
    """The outpainted canvas' sides, refused above `max_side` before anything is allocated."""
    canvas = (height + margins["top"] + margins["bottom"], width + margins["left"] + margins["right"])
    if max(canvas) > max_side:
        shown = ",".join(f"{k}={v}" for k, v in margins.items() if v)
        raise InvalidArgumentError(f"outpaint {shown} grows the {width}x{height} image to {canvas[1]}x{canvas[0]} px",
                                   accepted=f"a canvas with sides up to {max_side} px (what the artifacts accept)",
                                   fix="use smaller margins")
    return canvas


def outpaint_canvas(image: torch.Tensor, margins: dict[str, int],
                    max_side: int = MAX_IMAGE_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """The image on a canvas grown by `margins` (new area 0, mid grey) and the user mask (1 on the new area)."""
    _, _, h, w = image.shape
    top, left = margins["top"], margins["left"]
    height, width = check_canvas(h, w, margins, max_side)
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
