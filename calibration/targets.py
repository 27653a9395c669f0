"""What `k3trt calibrate` quantizes, and on which task's denoising trajectories: read from the cards and the
runtime's task table, not written here.

A component can be calibrated when its card allows an int8 variant (`precision.quantized`): the base U-Net,
the inpainting U-Net and the Flash U-Net. Its trajectories come from the first runtime task that runs it
(`k3trt.runtime.tasks.TASK_COMPONENTS`): text to image for `unet`, inpainting for `unet_inpainting` (masked
image latents and the mask channel, on real masks: `masks.py`), Flash for `unet_flash`.
"""
from __future__ import annotations

import dataclasses

from k3trt.calibration.config import TrajectoryConfig
from k3trt.contract.cards import (
    BatchRule,
    ComponentCard,
    card,
    quantizable_components,
)
from k3trt.contract.errors import InvalidArgumentError


def _task_components() -> dict:
    from k3trt.runtime.tasks import (
        TASK_COMPONENTS,  # imports torch: only when a target is used, not for --help
    )

    return TASK_COMPONENTS

QUANTIZED_PRECISION = "int8"


def quantizable() -> tuple[str, ...]:
    """Components whose card allows an int8 Q/DQ variant, in card order."""
    return quantizable_components(QUANTIZED_PRECISION)


@dataclasses.dataclass(frozen=True)
class Target:
    component: str  # the card of the U-Net being quantized
    task: str  # the runtime task whose loop feeds it (a key of TASK_COMPONENTS)

    @property
    def card(self) -> ComponentCard:
        return card(self.component)

    @property
    def output(self) -> str:
        return self.card.output_names[0]

    def exports(self) -> tuple[str, ...]:
        """The components a trajectory runs through (their export keys are part of its cache key)."""
        return ("text_encoder", *_task_components()[self.task], "movq_decoder")

    @property
    def masked(self) -> bool:
        """Inpainting: trajectories start from a source image and a mask (`masks.calibration_mask`)."""
        return self.task == "inpaint"

    def guided(self, config: TrajectoryConfig) -> bool:
        """Whether each U-Net call holds [uncond, cond] (the card's batch rule, and guidance > 1 as diffusers)."""
        return self.card.batch_rule is BatchRule.GUIDED and config.guidance > 1.0

    def calls_per_prompt(self, config: TrajectoryConfig) -> int:
        from k3trt.runtime.official_sampler import FLASH_TIMESTEPS, official_timesteps

        if self.task == "flash":
            return len(FLASH_TIMESTEPS)
        return len(official_timesteps(config.steps)) if self.masked else config.steps

    def run(self, pipe, prompt: str, seed: int, config: TrajectoryConfig, inputs: dict, *, decode: bool = True):
        """The task on `pipe` for one prompt; float images (1, H, W, 3), or the final latents with `decode=False`.
        Inpainting returns the decoder's output everywhere (`preserve_unmasked=False`), so quality measures every
        pixel the U-Net shaped."""
        size, output_type = dict(height=config.height, width=config.width), "np" if decode else "latent"
        if self.task == "flash":
            return pipe.flash(prompt, seed=seed, output_type=output_type, **size)
        guided = dict(seed=seed, steps=config.steps, guidance=config.guidance, output_type=output_type)
        if self.masked:
            return pipe.inpaint(prompt, inputs["input_image"], inputs["user_mask"], preserve_unmasked=False,
                                **guided)
        return pipe.generate(prompt, **guided, **size)


def target_of(component: str) -> Target:
    """The calibration target for `component`, or a typed error naming what can be calibrated."""
    allowed = quantizable()
    if component not in allowed:
        raise InvalidArgumentError(f"--component {component!r} has no int8 variant",
                                   accepted=", ".join(allowed), fix="e.g. --component unet_inpainting")
    task = next(t for t, parts in _task_components().items() if component in parts)
    return Target(component, task)


TEXT_TO_IMAGE = target_of("unet")
