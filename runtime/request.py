"""A generation request, validated once: prompts, seed, steps, guidance and the image size after diffusers'
rounding. Every task and the serving engine build their requests here."""
from __future__ import annotations

import dataclasses
import logging

from k3trt.contract.arguments import MAX_IMAGES, MAX_STEPS, check_float, check_int, check_seed, check_texts
from k3trt.contract.cards import LATENT_FACTOR, PIXEL_MULTIPLE, round_pixels
from k3trt.contract.errors import InvalidArgumentError

log = logging.getLogger("k3trt")


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request (what `generate` was asked, after diffusers' rounding)."""
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    seed: int
    steps: int
    guidance: float
    height: int  # actual output size: multiples of PIXEL_MULTIPLE (64), as diffusers rounds
    width: int
    num_images: int

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (len(self.prompts) * self.num_images, 4, self.height // LATENT_FACTOR, self.width // LATENT_FACTOR)

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0  # diffusers: classifier-free guidance only when g > 1


def make_request(prompt, negative_prompt=None, *, seed: int = 0, steps: int = 25, guidance: float = 3.0,
                 height: int = 1024, width: int = 1024, num_images: int = 1) -> Request:
    prompts = check_texts("prompt", prompt)
    negatives = None
    if negative_prompt is not None:
        negatives = check_texts("negative_prompt", negative_prompt)
        if isinstance(negative_prompt, str):
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InvalidArgumentError(f"{len(negatives)} negative prompts for {len(prompts)} prompts",
                                       accepted="one negative prompt, or one per prompt",
                                       fix="pass one negative prompt as a str, or a list as long as the prompts")
    check_int("steps", steps, 1, MAX_STEPS, "e.g. --steps 25")
    check_int("num_images", num_images, 1, MAX_IMAGES, "e.g. num_images=1 (--batch 1 on the command line)")
    check_float("guidance", guidance, 0.0, 1e4, "e.g. --guidance 3.0 (the default); 1 or less: no CFG")
    check_seed(seed)
    if len(prompts) * num_images > MAX_IMAGES:
        raise InvalidArgumentError(f"{len(prompts)} prompts x {num_images} images", accepted=f"at most {MAX_IMAGES}"
                                   " images per request", fix="split the work into several requests")
    size = []
    for name, value in (("height", height), ("width", width)):
        check_int(name, value, 1, 1 << 16, "an image side in pixels, e.g. 1024")
        rounded = round_pixels(value)  # diffusers' downscale_height_and_width
        if rounded != value:
            log.warning("%s %d is not a multiple of %d: the image will be %d px (diffusers rounds up)",
                        name, value, PIXEL_MULTIPLE, rounded)
        size.append(rounded)
    return Request(tuple(prompts), tuple(negatives) if negatives else None, seed, steps, float(guidance),
                   size[0], size[1], num_images)
