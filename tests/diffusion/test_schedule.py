"""Noise schedules, timestep spacings and σ helpers equal diffusers' (an independent implementation)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from latent_diffusion.diffusion.schedule import (BETA_SCHEDULES, karras_sigmas, make_schedule, sigma_to_t,
                                                 timestep_grid)

DIFFUSERS_NAMES = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
                   "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}


def _diffusers_ddpm(name: str, zero_terminal_snr: bool = False) -> DDPMScheduler:
    beta_schedule, beta_start, beta_end = DIFFUSERS_NAMES[name]
    return DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                         rescale_betas_zero_snr=zero_terminal_snr)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_betas_and_alphas_cumprod_equal_diffusers(name, zero_terminal_snr):
    ours = make_schedule(name, zero_terminal_snr=zero_terminal_snr)
    ref = _diffusers_ddpm(name, zero_terminal_snr)
    assert ours.num_timesteps == 1000
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    if zero_terminal_snr:  # β_t = 1 − ᾱ_t/ᾱ_{t−1} of tiny ᾱ's: diffusers' float32 is ~7e-6 off; compare in float64
        ref_betas = diffusers_rescale(make_schedule(name).betas.clone())
    else:
        ref_betas = ref.betas.double()
    torch.testing.assert_close(ours.betas, ref_betas, atol=1e-6, rtol=0)


def test_zero_terminal_snr_ends_at_pure_noise_and_keeps_the_first_step():
    plain, rescaled = make_schedule("scaled_linear"), make_schedule("scaled_linear", zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1] == 0
    assert torch.isfinite(rescaled.sigmas).all()  # ᾱ_T floored at 2⁻²⁴ for σ, as diffusers
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0])


@pytest.mark.parametrize("num_steps", [1, 7, 10, 25, 50])
@pytest.mark.parametrize("spacing,steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timestep_grids_equal_diffusers(spacing, steps_offset, num_steps):
    kw = dict(timestep_spacing=spacing, steps_offset=steps_offset)
    ddim, euler = DDIMScheduler(**kw), EulerDiscreteScheduler(**kw)
    ddim.set_timesteps(num_steps)
    euler.set_timesteps(num_steps)
    grid = timestep_grid(num_steps, spacing, 1000, steps_offset)
    assert grid.round().long().tolist() == ddim.timesteps.tolist()
    torch.testing.assert_close(grid.float(), euler.timesteps, atol=1e-4, rtol=0)


def test_sigmas_sigma_to_t_and_karras_sigmas_equal_diffusers():
    schedule = make_schedule("scaled_linear")
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # diffusers works in float32, where 1 − ᾱ_0 ≈ 8.5e-4 keeps only ~5 significant digits
    torch.testing.assert_close(schedule.sigmas.flip(0), ref.sigmas[:-1].double(), rtol=2e-5, atol=0)

    sigmas = torch.exp(torch.linspace(-4, 3, 37, dtype=torch.float64))
    log_sigmas = schedule.log_sigmas.numpy()
    expected = np.array([ref._sigma_to_t(s, log_sigmas) for s in sigmas.numpy()])
    np.testing.assert_allclose(sigma_to_t(sigmas, schedule.log_sigmas).numpy(), expected, atol=1e-6)

    expected = ref._convert_to_karras(in_sigmas=torch.tensor([14.6, 0.03]), num_inference_steps=12)
    np.testing.assert_allclose(karras_sigmas(0.03, 14.6, 12).numpy(), expected, rtol=1e-6)


def test_unknown_names_and_bad_grids_are_clear_errors():
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'; expected one of: linear, scaled_linear"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'; expected one of: leading"):
        timestep_grid(10, "uniform")
    with pytest.raises(ValueError, match="num_steps must be in"):
        timestep_grid(0)
    with pytest.raises(ValueError, match="outside"):
        timestep_grid(1000, "leading", 1000, steps_offset=1)
