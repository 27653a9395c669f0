"""Pixel operations between animation frames: Deforum's 2D camera warp and colour coherence, and the zoom videos'
shrink and crops. Frames are 8-bit RGB PIL images throughout, so a run resumed from the PNGs on disk computes what
an uninterrupted run computes.

Written here rather than taken from OpenCV/scikit-image (what Deforum uses): the warp is one `grid_sample` of
torch, which the runtime already has, and histogram matching is ten lines of numpy; neither library is worth its
install size for that.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

EDGE_TOLERANCE_PX = 1e-6  # float slack when deciding which whole pixels lie inside a zoomed box


# ----------------------------------------------------------------------------------------- Deforum's 2D motion
def camera_matrix(width: int, height: int, *, angle: float, zoom: float, translate_x: float,
                  translate_y: float) -> np.ndarray:
    """Deforum's `anim_frame_warp_2d`: cv2.getRotationMatrix2D((W // 2, H // 2), angle, zoom) @ translation, as a
    3 x 3 matrix from source to destination pixel coordinates (angle in degrees, counter-clockwise; zoom > 1 zooms
    in; translation in pixels per frame, +x right, +y down)."""
    cx, cy = width // 2, height // 2
    a, b = zoom * math.cos(math.radians(angle)), zoom * math.sin(math.radians(angle))
    rotate = np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy], [0, 0, 1]])
    translate = np.array([[1, 0, translate_x], [0, 1, translate_y], [0, 0, 1]], dtype=np.float64)
    return rotate @ translate


def warp_2d(image, *, angle: float = 0.0, zoom: float = 1.0, translate_x: float = 0.0, translate_y: float = 0.0):
    """The previous frame moved by the camera: bilinear, edges repeated (cv2.warpPerspective with
    BORDER_REPLICATE, Deforum's default border), rounded back to 8 bits."""
    from PIL import Image

    width, height = image.size
    inverse = np.linalg.inv(camera_matrix(width, height, angle=angle, zoom=zoom, translate_x=translate_x,
                                          translate_y=translate_y))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    src = inverse @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    grid = np.stack([(2 * src[0] + 1) / width - 1, (2 * src[1] + 1) / height - 1], axis=-1)  # pixel centres
    grid = torch.from_numpy(grid.reshape(1, height, width, 2).astype(np.float32))
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    moved = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = moved[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(out, "RGB")


# ----------------------------------------------------------------------------------------- colour coherence
def match_histogram(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each channel of `source` (uint8, H x W x C) mapped so its histogram matches `reference`'s: the quantile
    mapping of scikit-image's `match_histograms` (what Deforum calls), rounded to 8 bits."""
    out = np.empty_like(source)
    for c in range(source.shape[-1]):
        values, inverse, counts = np.unique(source[..., c].ravel(), return_inverse=True, return_counts=True)
        ref_values, ref_counts = np.unique(reference[..., c].ravel(), return_counts=True)
        quantiles = np.cumsum(counts) / source[..., c].size
        ref_quantiles = np.cumsum(ref_counts) / reference[..., c].size
        mapped = np.interp(quantiles, ref_quantiles, ref_values)
        out[..., c] = np.round(mapped[inverse]).clip(0, 255).astype(np.uint8).reshape(source.shape[:2])
    return out


@functools.lru_cache(maxsize=1)
def _lab_transforms():
    from PIL import ImageCms

    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    return (ImageCms.buildTransform(srgb, lab, "RGB", "LAB"), ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))


def _to_space(image, mode: str):
    from PIL import ImageCms

    rgb = image.convert("RGB")
    if mode == "lab":
        return ImageCms.applyTransform(rgb, _lab_transforms()[0])
    return rgb.convert("HSV") if mode == "hsv" else rgb


def _from_space(array: np.ndarray, mode: str):
    from PIL import Image, ImageCms

    image = Image.fromarray(array, {"lab": "LAB", "hsv": "HSV"}.get(mode, "RGB"))
    if mode == "lab":
        return ImageCms.applyTransform(image, _lab_transforms()[1])
    return image.convert("RGB")


def match_colors(image, reference, mode: str):
    """Deforum's `maintain_colors`: `image`'s histograms matched to `reference`'s in RGB, HSV or CIELAB."""
    if mode == "none":
        return image
    matched = match_histogram(np.asarray(_to_space(image, mode)), np.asarray(_to_space(reference, mode)))
    return _from_space(matched, mode)


# ----------------------------------------------------------------------------------------- zoom videos
def shrink(image, size: tuple[int, int]):
    """The previous keyframe made small for the centre of the next one (Lanczos)."""
    from PIL import Image

    return image.resize(size, Image.Resampling.LANCZOS)


def zoom_between(inner, outer, inner_size: tuple[int, int], progress: float):
    """A frame between keyframe `inner` (progress 0) and `outer` (progress 1), where `outer` holds `inner` shrunk to
    `inner_size` in its centre: the centred crop of `outer` zoomed by (W / inner_w)^(1 - progress) per axis (a
    constant zoom speed), with the sharper `inner` drawn over the part it covers. Crops take sub-pixel boxes
    (Pillow's `resize(box=...)`), so the zoom moves smoothly and both ends are the keyframes exactly."""
    from PIL import Image

    if progress <= 0:
        return inner.copy()
    if progress >= 1:
        return outer.copy()
    width, height = outer.size
    zoom = [(side / inner_side) ** (1 - progress) for side, inner_side in zip((width, height), inner_size)]
    crop = [side / 2 - side / (2 * z) for side, z in zip((width, height), zoom)]  # left, top of the visible box
    frame = outer.resize((width, height), Image.Resampling.LANCZOS,
                         box=(crop[0], crop[1], width - crop[0], height - crop[1]))
    near = [((side - inner_side) / 2 - c) * z for side, inner_side, c, z in
            zip((width, height), inner_size, crop, zoom)]  # where inner's edges land in the frame
    far = [side - n for side, n in zip((width, height), near)]
    lo = [math.ceil(n - EDGE_TOLERANCE_PX) for n in near]
    hi = [math.floor(f + EDGE_TOLERANCE_PX) for f in far]
    if hi[0] <= lo[0] or hi[1] <= lo[1]:
        return frame
    scale = [side / (f - n) for side, f, n in zip((width, height), far, near)]
    box = [min(max((p - n) * s, 0.0), side) for p, n, s, side in
           zip((lo[0], lo[1], hi[0], hi[1]), near * 2, scale * 2, (width, height) * 2)]
    frame.paste(inner.resize((hi[0] - lo[0], hi[1] - lo[1]), Image.Resampling.LANCZOS, box=tuple(box)),
                (lo[0], lo[1]))
    return frame
