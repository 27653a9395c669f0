"""The samplers of the official Kandinsky 3 code (`kandinsky3/model/diffusion.py: BaseDiffusion`), written from
the equations; the inpainting task and Kandinsky 3.1 Flash use them (docs/tasks.md says what each step does).

Both run on the cosine ("squaredcos_cap_v2") betas over 1000 training steps, the schedule the official
`get_named_beta_schedule('cosine', 1000)` builds. Noise comes from the caller's generator, in the order the
official loop draws it (start latents, then one draw per step), so a seeded run is reproducible.
"""
from __future__ import annotations

import torch
from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime.scheduler import SchedulerConfig, make_betas

TRAIN_STEPS = 1000
FLASH_TIMESTEPS = (979, 729, 479, 229)  # t2i_pipeline.py with gan=True: range(979, 0, -250)


def _alphas_cumprod() -> torch.Tensor:
    betas = make_betas(SchedulerConfig(num_train_timesteps=TRAIN_STEPS, beta_schedule="squaredcos_cap_v2"))
    return torch.cumprod(1.0 - betas, dim=0)


def official_timesteps(steps: int) -> list[int]:
    """`range(999, 0, -1000 // steps)`: for steps that do not divide 1000 this runs a few more than asked."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= TRAIN_STEPS:
        raise InvalidArgumentError(f"steps={steps!r}", accepted=f"an integer in 1..{TRAIN_STEPS}",
                                   fix="e.g. --steps 50 (the official inpainting default)")
    return list(range(TRAIN_STEPS - 1, 0, -(TRAIN_STEPS // steps)))


class OfficialSampler:
    """`BaseDiffusion.p_sample` with eta and dynamic thresholding of x_0 (`percentile`), t -> s, s = 0 last."""

    init_noise_sigma = 1.0

    def __init__(self, *, percentile: float | None = 0.95, eta: float = 1.0):
        self.alphas_cumprod = _alphas_cumprod()
        self.percentile, self.eta = percentile, eta
        self.timesteps: list[int] = []
        self._prev: dict[int, int] = {}

    def set_timesteps(self, steps: int) -> list[int]:
        self.timesteps = official_timesteps(steps)
        self._prev = dict(zip(self.timesteps, self.timesteps[1:] + [0]))
        return self.timesteps

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Per sample: q = max(quantile(|x_0|, percentile), 1); x_0 = clip(x_0, -q, q) / q."""
        if self.percentile is None:
            return x0.clamp(-1.0, 1.0)
        q = torch.quantile(x0.flatten(1).abs(), self.percentile, dim=-1).clamp(min=1.0)
        q = q.reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, q), -q) / q

    def step(self, noise_pred: torch.Tensor, t: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        s = self._prev[t]
        a_t, a_s = self.alphas_cumprod[t], self.alphas_cumprod[s]  # s = 0 reads alphas_cumprod[0], not 1
        # 1. x_0 implied by the guided epsilon, then thresholded; 2. the epsilon that x_0 implies
        x0 = self.threshold((sample - (1 - a_t).sqrt() * noise_pred) / a_t.sqrt())
        eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        # 3. DDIM-style step with eta-scaled noise (eta = 1: the DDPM posterior variance)
        sigma = (self.eta * (1 - a_t / a_s) * (1 - a_s) / (1 - a_t)).sqrt()
        mean = a_s.sqrt() * x0 + (1 - a_s - sigma ** 2).sqrt() * eps
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype)  # drawn at every step
        return mean + (sigma * noise.to(sample.device) if s != 0 else 0.0)


class FlashSampler:
    """Kandinsky 3.1 Flash (`p_sample_loop(gan=True)`): x_t = q(x_t | x_0) with fresh noise, x_0 <- the U-Net's
    prediction, at t = 979, 729, 479, 229. No guidance; the final x_0 is decoded."""

    init_noise_sigma = 1.0

    def __init__(self):
        self.alphas_cumprod = _alphas_cumprod()
        self.timesteps = list(FLASH_TIMESTEPS)

    def set_timesteps(self, steps: int | None = None) -> list[int]:
        if steps not in (None, len(FLASH_TIMESTEPS)):
            raise InvalidArgumentError(f"steps={steps!r} with Flash", accepted=str(len(FLASH_TIMESTEPS)),
                                       fix="leave --steps out with --flash (the distilled model runs 4 steps)")
        return self.timesteps

    def noisy(self, x0: torch.Tensor, t: int, generator: torch.Generator | None) -> torch.Tensor:
        a_t = self.alphas_cumprod[t]
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    def x0(self, noise_pred: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        a_t = self.alphas_cumprod[t]
        return (x_t - (1 - a_t).sqrt() * noise_pred) / a_t.sqrt()
