"""The runtime's schedulers against diffusers', step by step, with the same generator."""
import json

import pytest
import torch

from k3trt.export.presets import SCHEDULER_CONFIG
from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime.scheduler import make_scheduler


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_matches_diffusers_step_by_step(name, steps):
    from diffusers import DDIMScheduler, DDPMScheduler

    reference = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[name].from_config(SCHEDULER_CONFIG)
    ours = make_scheduler(name, json.loads(json.dumps(SCHEDULER_CONFIG)))
    reference.set_timesteps(steps)
    assert ours.set_timesteps(steps) == reference.timesteps.tolist()
    gen_ref, gen_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        x_ref = reference.step(eps, torch.tensor(t), x_ref, generator=gen_ref).prev_sample
        x_ours = ours.step(eps, t, x_ours, generator=gen_ours)
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-6)
    # the generators advanced identically: the next draw is the same
    assert torch.equal(torch.randn(3, generator=gen_ref), torch.randn(3, generator=gen_ours))


def test_kandinsky_timesteps():
    scheduler = make_scheduler("ddpm", SCHEDULER_CONFIG)
    timesteps = scheduler.set_timesteps(25)
    assert timesteps[:3] == [961, 921, 881] and timesteps[-1] == 1 and len(timesteps) == 25


@pytest.mark.parametrize("steps", [0, -3, 1000])
def test_bad_step_counts_are_typed_errors(steps):
    with pytest.raises(InvalidArgumentError, match="steps"):
        make_scheduler("ddpm", SCHEDULER_CONFIG).set_timesteps(steps)


def test_unknown_scheduler_and_unsupported_config():
    with pytest.raises(InvalidArgumentError, match="ddim"):
        make_scheduler("euler", SCHEDULER_CONFIG)
    with pytest.raises(InvalidArgumentError, match="epsilon"):
        make_scheduler("ddpm", {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
