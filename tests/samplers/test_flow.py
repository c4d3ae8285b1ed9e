"""The flow samplers against diffusers' flow-matching schedulers, and the flow objective's path and target."""

from __future__ import annotations

import pytest
import torch

from latent_diffusion.diffusion.flow import FlowDenoiser, FlowSchedule, flow_loss, logit_normal
from latent_diffusion.samplers import SAMPLERS, get_sampler

diffusers = pytest.importorskip("diffusers")


def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear stand-in for a network: depends on x and on the timestep it is given."""
    return torch.tanh(x.flip(1) * 0.7) + (timestep / 1000).reshape(-1, 1, 1, 1) * x.roll(1, dims=-1)


PARITY = {"flow_euler": "FlowMatchEulerDiscreteScheduler", "flow_heun": "FlowMatchHeunDiscreteScheduler"}


def test_every_flow_sampler_has_a_parity_case():
    assert set(PARITY) == {name for name, spec in SAMPLERS.items() if spec.objective == "flow"}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name,scheduler", PARITY.items())
def test_flow_samplers_equal_diffusers_schedulers(name, scheduler, shift):
    steps, noise = 7, torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    schedule = FlowSchedule(1000, shift)
    sampler = get_sampler(name)
    ours = sampler.sample(FlowDenoiser(velocity, schedule), noise, sampler.make_grid(schedule, steps))
    theirs = getattr(diffusers, scheduler)(num_train_timesteps=1000, shift=shift)
    theirs.set_timesteps(steps)
    x = noise.clone()
    for t in theirs.timesteps:
        x = theirs.step(velocity(x, t.expand(2).float()), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
    grid = sampler.make_grid(schedule, steps)
    assert grid.sigmas[0] == 1.0 and grid.sigmas[-1] == 0.0 and len(grid.sigmas) == steps + 1


def test_flow_loss_is_the_velocity_of_the_straight_path():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9])
    seen = {}

    def exact(x_t, timestep):  # a network that knows x_0 and ε predicts the velocity exactly
        seen["x_t"], seen["timestep"] = x_t, timestep
        return noise - x0

    assert flow_loss(exact, x0, t, noise).item() == 0.0
    assert torch.allclose(seen["x_t"], (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise)
    assert torch.allclose(seen["timestep"], t * 1000)
    assert flow_loss(lambda x_t, timestep: torch.zeros_like(x_t), x0, t, noise) > 0.5


def test_logit_normal_times_lie_in_the_open_unit_interval_around_the_middle():
    t = logit_normal(20000, torch.Generator().manual_seed(0), mean=0.0, std=1.0)
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.01
    assert abs((t < 0.2).float().mean().item() - 0.0816) < 0.01  # P(u < logit 0.2 = −1.386) for u ~ N(0, 1)


def test_a_flow_model_denoises_exactly_with_the_true_velocity():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = 0.3
    x_t = (1 - t) * x0 + t * noise
    denoiser = FlowDenoiser(lambda x, timestep: noise - x0, FlowSchedule())
    assert torch.allclose(denoiser.denoise(x_t, t), x0, atol=1e-6)


def test_flow_samplers_refuse_a_diffusion_schedule_and_bad_step_counts():
    from latent_diffusion.diffusion.schedule import make_schedule
    for name in PARITY:
        with pytest.raises(ValueError, match="the flow samplers sample flow models"):
            get_sampler(name).make_grid(make_schedule(), 5)
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            get_sampler(name).make_grid(FlowSchedule(), 0)
