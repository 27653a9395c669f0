"""Schedulers written from the equations (no diffusers import), matching diffusers step for step.

DDPM: Ho et al. 2020 (https://arxiv.org/abs/2006.11239), eqs. (6), (7), (15).
DDIM: Song et al. 2020 (https://arxiv.org/abs/2010.02502), eq. (12), deterministic (eta = 0).
The beta schedule, timestep spacing and clipping follow the scheduler config the artifacts carry.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from k3trt.contract.errors import InvalidArgumentError

SUPPORTED_SPACING = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    variance_type: str = "fixed_small"
    thresholding: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        if config.prediction_type != "epsilon" or config.thresholding:
            raise InvalidArgumentError(
                f"scheduler prediction_type={config.prediction_type!r}, thresholding={config.thresholding}",
                accepted="epsilon prediction without thresholding (Kandinsky 3)")
        if config.timestep_spacing not in SUPPORTED_SPACING:
            raise InvalidArgumentError(f"timestep_spacing {config.timestep_spacing!r}",
                                       accepted=", ".join(SUPPORTED_SPACING))
        return config


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    n = config.num_train_timesteps
    if config.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. (17), capped at 0.999
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32)
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    raise InvalidArgumentError(f"beta_schedule {config.beta_schedule!r}",
                               accepted="squaredcos_cap_v2, linear, scaled_linear")


def spaced_timesteps(config: SchedulerConfig, steps: int) -> list[int]:
    n = config.num_train_timesteps
    if not 1 <= steps <= n:
        raise InvalidArgumentError(f"steps={steps}", accepted=f"1..{n}", fix="e.g. --steps 25 (the default)")
    if config.timestep_spacing == "leading":
        ratio = n // steps
        timesteps = [i * ratio + config.steps_offset for i in reversed(range(steps))]
        if timesteps[0] >= n:  # e.g. 1000 steps with steps_offset 1 would ask for t = 1000
            raise InvalidArgumentError(f"steps={steps} puts the first timestep at {timesteps[0]}",
                                       accepted=f"steps whose first timestep is < {n} (at most {n - 1} here)",
                                       fix="use fewer steps, e.g. --steps 25")
        return timesteps
    if config.timestep_spacing == "trailing":
        ratio = n / steps
        return [int(round(n - i * ratio)) - 1 for i in range(steps)]
    return [int(round(x)) for x in torch.linspace(0, n - 1, steps, dtype=torch.float64).flip(0).tolist()]


class DDPMScheduler:
    """`set_timesteps(steps)`, then `step(noise_pred, t, sample, generator) -> prev_sample` per timestep."""

    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.betas = make_betas(config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.timesteps: list[int] = []

    def set_timesteps(self, steps: int) -> list[int]:
        self.timesteps = spaced_timesteps(self.config, steps)
        self._prev = {t: (self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1)
                      for i, t in enumerate(self.timesteps)}
        return self.timesteps

    def _alpha_prod(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """q(x_t | x_0), eq. (4): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (diffusers' `add_noise`)."""
        if not 0 <= int(t) < self.config.num_train_timesteps:
            raise InvalidArgumentError(f"timestep {t}", accepted=f"0..{self.config.num_train_timesteps - 1}")
        a_t = self.alphas_cumprod[int(t)].to(original.device)
        return a_t ** 0.5 * original + (1 - a_t) ** 0.5 * noise.to(original.device)

    def predicted_x0(self, noise_pred: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The x_0 an epsilon prediction implies, eq. (15), before clipping."""
        a_t = self._alpha_prod(t)
        return (sample - (1 - a_t) ** 0.5 * noise_pred) / a_t ** 0.5

    def step(self, noise_pred: torch.Tensor, t: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        prev_t = self._prev[t]
        # 1. alphas and betas of this jump (t -> prev_t), which spans several training steps
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        # 2. predicted x_0, eq. (15)
        x0 = self.predicted_x0(noise_pred, t, sample)
        # 3. clip x_0
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        # 4.-5. posterior mean, eq. (7)
        mean = (a_prev ** 0.5 * beta_t / b_t) * x0 + (alpha_t ** 0.5 * b_prev / b_t) * sample
        # 6. add posterior variance noise (fixed_small: beta tilde, eq. (7)); drawn whenever t > 0, as diffusers
        # does, so the generator advances identically
        if t > 0:
            noise = torch.randn(noise_pred.shape, generator=generator, dtype=noise_pred.dtype,
                                device=generator.device if generator is not None else "cpu")
            variance = (b_prev / b_t * beta_t).clamp(min=1e-20)
            if self.config.variance_type == "fixed_large":
                variance = beta_t
            mean = mean + variance ** 0.5 * noise.to(mean.device)
        return mean


class DDIMScheduler(DDPMScheduler):
    """Deterministic DDIM (eta = 0) on the same betas; `set_alpha_to_one` as diffusers' default."""

    def set_timesteps(self, steps: int) -> list[int]:
        super().set_timesteps(steps)
        ratio = self.config.num_train_timesteps // steps
        self._prev = {t: t - ratio for t in self.timesteps}  # diffusers DDIM: fixed stride, not the list
        return self.timesteps

    def step(self, noise_pred, t, sample, generator=None):
        a_prev = self._alpha_prod(self._prev[t])
        x0 = self.predicted_x0(noise_pred, t, sample)  # eq. (12), "predicted x_0"
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * noise_pred  # "direction pointing to x_t", sigma=0


SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def make_scheduler(name: str, config: dict) -> DDPMScheduler:
    if name not in SCHEDULERS:
        raise InvalidArgumentError(f"unknown scheduler {name!r}", accepted=", ".join(SCHEDULERS),
                                   fix="--scheduler ddpm reproduces diffusers.Kandinsky3Pipeline")
    return SCHEDULERS[name](SchedulerConfig.from_dict(config))
