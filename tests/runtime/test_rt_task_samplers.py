"""Scheduler additions for the tasks (add_noise, predicted x0) and the official samplers (inpainting, Flash)."""
import json

import pytest
import torch

from k3trt.export.presets import SCHEDULER_CONFIG
from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime.official_sampler import FlashSampler, OfficialSampler, official_timesteps
from k3trt.runtime.scheduler import make_scheduler


@pytest.mark.parametrize("t", [1, 41, 500, 961, 999])
def test_add_noise_matches_diffusers(t):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    ours = make_scheduler("ddpm", json.loads(json.dumps(SCHEDULER_CONFIG)))
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    want = reference.add_noise(x0, noise, torch.tensor([t, t]))
    assert torch.equal(ours.add_noise(x0, noise, t), want)
    # predicted x0 inverts add_noise (eq. 15 is eq. 4 solved for x0); fp32 error grows as 1 / sqrt(abar_t)
    scale = float(ours.alphas_cumprod[t]) ** -0.5
    torch.testing.assert_close(ours.predicted_x0(noise, t, want), x0, rtol=0, atol=1e-5 * scale)
    with pytest.raises(InvalidArgumentError, match="timestep 1000"):
        ours.add_noise(x0, noise, 1000)


def test_official_timesteps():
    assert official_timesteps(50)[:3] == [999, 979, 959] and official_timesteps(50)[-1] == 19
    assert len(official_timesteps(50)) == 50 and official_timesteps(4) == [999, 749, 499, 249]
    assert len(official_timesteps(7)) == 8  # range(999, 0, -142): the official loop runs one more
    assert FlashSampler().set_timesteps() == [979, 729, 479, 229]
    with pytest.raises(InvalidArgumentError, match="steps=0"):
        official_timesteps(0)
    with pytest.raises(InvalidArgumentError, match="with Flash"):
        FlashSampler().set_timesteps(25)


def test_official_sampler_matches_the_reference_restatement():
    """The runtime's sampler and the torch reference's `_p_sample` are written separately from diffusion.py."""
    from k3trt.verify.task_reference import _cosine_alphas_cumprod, _p_sample

    sampler = OfficialSampler()
    times = sampler.set_timesteps(10)
    torch.testing.assert_close(sampler.alphas_cumprod, _cosine_alphas_cumprod())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1 = x2 = torch.randn(2, 4, 8, 8) * 3  # large enough that thresholding engages
    for t, s in zip(times, times[1:] + [0]):
        eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        x1 = sampler.step(eps, t, x1, generator=g1)
        x2 = _p_sample(x2, t, s, eps, _cosine_alphas_cumprod(), g2)
        torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x1).all()


def test_threshold_is_dynamic():
    sampler = OfficialSampler()
    x0 = torch.cat([torch.full((1, 4, 4, 4), 0.5), torch.full((1, 4, 4, 4), 4.0)])
    out = sampler.threshold(x0)
    assert torch.equal(out[0], x0[0])  # quantile below 1: unchanged
    torch.testing.assert_close(out[1], torch.ones_like(out[1]))  # clipped to q = 4, divided by 4
