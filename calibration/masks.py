"""Inpainting masks for calibration trajectories: deterministic from the prompt's seed, in three layouts.

Prompt i (seed s = seed + i) gets layout `LAYOUTS[s % 3]`, so any run of prompts mixes them evenly:
- "box": one rectangle covering 10-45 % of the image (object removal / replacement);
- "strokes": 2-4 thick random polylines (a brush);
- "outpaint": bands along one or two sides, what `--outpaint` gives the U-Net on a grown canvas (the
  canvas's new area is repainted; its pixels are 0 either way, as the masked image sets the hole to 0).
Masks are user masks (1 = repaint, the convention of `k3trt.runtime.images`), uint8 (H, W). Everything is
drawn from `numpy.random.default_rng((MASK_SALT, seed))`: the same seed gives the same mask on every machine.
"""
from __future__ import annotations

import numpy as np
from k3trt.contract.cards import LATENT_FACTOR, PIXEL_MULTIPLE

MASK_VERSION = 1  # part of the inpainting trajectory key: bump when a layout changes
MASK_SALT = 0x6B336D  # keeps mask draws independent of anything else seeded with the same number
LAYOUTS = ("box", "strokes", "outpaint")


def layout_of(seed: int) -> str:
    return LAYOUTS[seed % len(LAYOUTS)]


def calibration_mask(seed: int, height: int, width: int) -> np.ndarray:
    """The user mask (uint8 0/1, (height, width), 1 = repaint) for the prompt seeded `seed`."""
    rng = np.random.default_rng((MASK_SALT, seed))
    draw = {"box": _box, "strokes": _strokes, "outpaint": _outpaint}[layout_of(seed)]
    mask = draw(rng, height, width)
    if not mask.any() or mask.all():  # never all-keep or all-repaint: both are other tasks
        mask[:, : width // 2] = 1
        mask[:, width // 2:] = 0
    return mask


def _box(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    area = rng.uniform(0.10, 0.45)
    aspect = rng.uniform(0.5, 2.0)
    h = int(np.clip(round(np.sqrt(area * height * width / aspect)), 1, height))
    w = int(np.clip(round(area * height * width / h), 1, width))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    mask = np.zeros((height, width), np.uint8)
    mask[top:top + h, left:left + w] = 1
    return mask


def _strokes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("L", (width, height), 0)
    pen = ImageDraw.Draw(image)
    side = min(height, width)
    for _ in range(int(rng.integers(2, 5))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(rng.integers(2, 6))]
        pen.line(points, fill=1, width=max(2, int(side * rng.uniform(0.06, 0.15))), joint="curve")
    return np.asarray(image, np.uint8).copy()


def _outpaint(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Bands on one or two sides: 1/8 to 1/2 of the side, on the runtime's 64-px outpaint grid where the image
    is at least 128 px, else on the latent grid (8 px) so small calibration sizes still keep an image."""
    mask = np.zeros((height, width), np.uint8)
    sides = rng.choice(["left", "right", "top", "bottom"], size=int(rng.integers(1, 3)), replace=False)
    for side in sides:
        extent = width if side in ("left", "right") else height
        grid = PIXEL_MULTIPLE if extent >= 2 * PIXEL_MULTIPLE else LATENT_FACTOR
        band = int(np.clip(round(extent * rng.uniform(0.125, 0.5) / grid) * grid, grid, extent - grid))
        if side == "left":
            mask[:, :band] = 1
        elif side == "right":
            mask[:, width - band:] = 1
        elif side == "top":
            mask[:band] = 1
        else:
            mask[height - band:] = 1
    return mask
