"""The grids that place a sampler's steps equal diffusers' schedulers' (an independent implementation) for every
spacing, offset, last ᾱ and Karras setting; a sampler's registry entry fills in its own defaults."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from latent_diffusion.diffusion.schedule import make_schedule
from latent_diffusion.samplers import GridOptions, get_sampler
from latent_diffusion.samplers.grid import discrete_grid, dpm_solver_grid, sigma_grid

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = make_schedule("scaled_linear")
SPACINGS = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
STEPS = [1, 7, 25]


def _close(ours: list[float], theirs: torch.Tensor) -> None:
    """diffusers computes σ's in float32, where 1 − ᾱ_0 ≈ 8.5e-4 keeps ~5 significant digits."""
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), theirs.double(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_discrete_grid_is_ddims(spacing, steps_offset, set_alpha_to_one, num_steps):
    ref = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(num_steps)
    grid = discrete_grid(SCHEDULE, num_steps, spacing, steps_offset, set_alpha_to_one)
    timesteps = ref.timesteps.tolist()
    assert [step.t for step in grid] == timesteps and [step.t_prev for step in grid] == timesteps[1:] + [-1]
    _close([step.alpha_cumprod for step in grid], ref.alphas_cumprod[ref.timesteps])
    _close([step.alpha_cumprod_prev for step in grid],
           torch.cat([ref.alphas_cumprod[ref.timesteps[1:]], ref.final_alpha_cumprod.reshape(1)]))


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_sigma_grid_is_eulers(spacing, steps_offset, karras, num_steps):
    ref = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=steps_offset, use_karras_sigmas=karras)
    ref.set_timesteps(num_steps)
    grid = sigma_grid(SCHEDULE, num_steps, spacing, steps_offset, karras)
    _close(grid.sigmas, ref.sigmas)
    assert grid.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=2e-5)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_solver_grid_is_dpm_solvers(spacing, steps_offset, karras, num_steps):
    ref = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", timestep_spacing=spacing,
                                      steps_offset=steps_offset, use_karras_sigmas=karras)
    ref.set_timesteps(num_steps)
    grid = dpm_solver_grid(SCHEDULE, num_steps, spacing, steps_offset, karras)
    _close(grid.sigmas, ref.sigmas)
    # diffusers draws x_T = noise · init_noise_sigma in the VP view; in ours, x = x_T/√ᾱ = x_T·√(σ_0² + 1)
    expected = float(ref.init_noise_sigma) * (float(ref.sigmas[0]) ** 2 + 1) ** 0.5
    assert grid.init_noise_sigma == pytest.approx(expected, rel=2e-5)


def test_each_sampler_fills_in_its_own_defaults_and_takes_only_its_options():
    ddim, plms, ddpm, euler = (get_sampler(name) for name in ("ddim", "plms", "ddpm", "euler"))
    assert ddim.make_grid(SCHEDULE, 10) == discrete_grid(SCHEDULE, 10, "leading", 0, set_alpha_to_one=True)
    assert plms.make_grid(SCHEDULE, 10) == discrete_grid(SCHEDULE, 10, "leading", 0, set_alpha_to_one=False)
    assert euler.make_grid(SCHEDULE, 10) == sigma_grid(SCHEDULE, 10, "linspace")
    sd = GridOptions(spacing="leading", steps_offset=1, set_alpha_to_one=False)  # a model's, for every sampler
    assert ddim.make_grid(SCHEDULE, 10, sd) == discrete_grid(SCHEDULE, 10, "leading", 1, set_alpha_to_one=False)
    assert ddpm.make_grid(SCHEDULE, 10, sd)[-1].alpha_cumprod_prev == 1.0  # DDPM's last step has no option
    assert euler.make_grid(SCHEDULE, 10, sd) == sigma_grid(SCHEDULE, 10, "leading", 1)


def test_karras_sigmas_for_a_sampler_without_them_are_an_error():
    with pytest.raises(ValueError, match="sampler ddim has no Karras σ spacing"):
        get_sampler("ddim").make_grid(SCHEDULE, 10, GridOptions(karras=True))
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        get_sampler("euler").make_grid(SCHEDULE, 0)
