"""Where a sampler's steps lie, built once and passed to it (k-diffusion style: samplers take the grid).

Two kinds of grid: the discrete VP samplers (DDPM, DDIM, PLMS) step between integer timesteps (`discrete_grid`);
the σ-space samplers (Euler, Heun, DPM-Solver++) between σ's (`sigma_grid`, `dpm_solver_grid`). Each grid
function takes `num_steps` and the spacing options a request may set (`GridOptions`), with the defaults of the
corresponding diffusers scheduler; Stable Diffusion's configs use spacing='leading', steps_offset=1 and, for
DDIM/PLMS, set_alpha_to_one=False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from latent_diffusion.diffusion.flow import FlowSchedule
from latent_diffusion.diffusion.schedule import (NoiseSchedule, TimestepSpacing, interpolate, karras_sigmas,
                                                 sigma_to_t, timestep_grid)


@dataclass(frozen=True)
class GridOptions:
    """How a request places a sampler's steps; None: the sampler's default. A sampler's registry entry names
    the options its grid takes (`SamplerSpec.grid_options`).

    :param spacing: the timesteps' spacing, "leading", "trailing" or "linspace" (Lin et al. 2023, Table 2).
    :param steps_offset: added to every 'leading' timestep.
    :param karras: σ's spaced by Karras et al. eq. 5 (σ-space samplers only).
    :param set_alpha_to_one: DDIM/PLMS's last step lands on ᾱ = 1 (True) or on ᾱ_0 (False, CompVis).
    """

    spacing: TimestepSpacing | None = None
    steps_offset: int = 0
    karras: bool = False
    set_alpha_to_one: bool | None = None


class DiscreteStep(NamedTuple):
    """One step t → t_prev of a VP sampler: t_prev = −1 after the last step, where ᾱ_prev is the final ᾱ."""

    t: int
    t_prev: int
    alpha_cumprod: float
    alpha_cumprod_prev: float


class SigmaGrid(NamedTuple):
    """σ_0 > … > σ_{n−1} > σ_n = 0, and the std of x at σ_0 that unit noise is scaled to (diffusers'
    `init_noise_sigma`): √(σ_0² + 1) for the VP prior x_T ~ N(0, I) seen as x_T/√ᾱ_T, or σ_0 (k-diffusion's)."""

    sigmas: list[float]
    init_noise_sigma: float


def check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def discrete_grid(schedule: NoiseSchedule, num_steps: int, spacing: TimestepSpacing = "leading",
                  steps_offset: int = 0, set_alpha_to_one: bool = True) -> list[DiscreteStep]:
    """The integer timesteps of `timestep_grid` (rounded), each with the next one and their ᾱ; after the last
    step ᾱ = 1, or ᾱ_0 without `set_alpha_to_one`."""
    check_num_steps(num_steps)
    final_alpha_cumprod = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0].item()
    ts = [int(t) for t in timestep_grid(num_steps, spacing, schedule.num_timesteps, steps_offset).round().tolist()]
    abar = schedule.alphas_cumprod.tolist()
    prevs = ts[1:] + [-1]
    return [DiscreteStep(t, p, abar[t], abar[p] if p >= 0 else final_alpha_cumprod)
            for t, p in zip(ts, prevs, strict=True)]


def _sigma_grid(sigmas: list[float], vp_prior: bool) -> SigmaGrid:
    return SigmaGrid(sigmas, (sigmas[0]**2 + 1) ** 0.5 if vp_prior else sigmas[0])


def sigma_grid(schedule: NoiseSchedule, num_steps: int, spacing: TimestepSpacing = "linspace",
               steps_offset: int = 0, karras: bool = False) -> SigmaGrid:
    """σ's at the spaced timesteps (σ interpolated linearly, as diffusers' Euler schedulers), or with `karras` n σ's
    by Karras et al. eq. 5 between the first and last of them; the VP prior for 'leading' spacing (as diffusers)."""
    check_num_steps(num_steps)
    t = timestep_grid(num_steps, spacing, schedule.num_timesteps, steps_offset)
    sigmas = interpolate(schedule.sigmas, t)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
    return _sigma_grid(sigmas.tolist() + [0.0], vp_prior=spacing == "leading")


def dpm_solver_grid(schedule: NoiseSchedule, num_steps: int, spacing: TimestepSpacing = "linspace",
                    steps_offset: int = 0, karras: bool = False) -> SigmaGrid:
    """DPM-Solver's grid (as diffusers' DPMSolverMultistepScheduler): n + 1 spaced timesteps with the last one
    dropped ('trailing': n), or n Karras σ's over the whole table; the VP prior."""
    check_num_steps(num_steps)
    if karras:
        sigmas = karras_sigmas(schedule.sigmas[0].item(), schedule.sigmas[-1].item(), num_steps)
    else:
        if spacing == "trailing":
            t = timestep_grid(num_steps, spacing, schedule.num_timesteps, steps_offset)
        else:
            if num_steps >= schedule.num_timesteps:
                raise ValueError(f"steps = {num_steps}: DPM-Solver's {spacing!r} grid spaces steps + 1 timesteps, so "
                                 f"it takes at most {schedule.num_timesteps - 1} steps")
            t = timestep_grid(num_steps + 1, spacing, schedule.num_timesteps, steps_offset)[:-1].round()
        sigmas = interpolate(schedule.sigmas, t)
    return _sigma_grid(sigmas.tolist() + [0.0], vp_prior=True)


class FlowGrid(NamedTuple):
    """A flow model's times t_0 = 1 > … > t_n = 0 (`diffusion.flow.FlowSchedule`): x at t_0 is the noise itself,
    and between steps x_t = (1 − t)·x_0 + t·ε (not x_0 + σ·ε)."""

    sigmas: list[float]
    init_noise_sigma: float = 1.0


def flow_grid(schedule: FlowSchedule, num_steps: int) -> FlowGrid:
    """The flow samplers' grid: diffusers' FlowMatchEulerDiscreteScheduler times with the schedule's shift."""
    if not isinstance(schedule, FlowSchedule):
        raise ValueError("the flow samplers sample flow models (diffusion.objective: flow)")
    return FlowGrid(schedule.sigmas(num_steps))


Grid = list[DiscreteStep] | SigmaGrid | FlowGrid


def grid_length(grid: Grid) -> int:
    """The number of steps of a grid."""
    return len(grid.sigmas) - 1 if isinstance(grid, (SigmaGrid, FlowGrid)) else len(grid)


def grid_from(grid: Grid, start: int) -> Grid:
    """The steps of `grid` from step `start` on, for a sampler that starts from `noised(grid, start, …)` rather than
    from unit noise (img2img: diffusers' `timesteps[t_start:]` with `set_begin_index`)."""
    if not 0 <= start < grid_length(grid):
        raise ValueError(f"start step {start}: expected 0 to {grid_length(grid) - 1}")
    if isinstance(grid, FlowGrid):
        return FlowGrid(grid.sigmas[start:])
    if isinstance(grid, SigmaGrid):
        return SigmaGrid(grid.sigmas[start:], init_noise_sigma=1.0)  # the sampler's x is then given as it is
    return grid[start:]


def grid_until(grid: Grid, end: int) -> Grid:
    """The first `end` steps of `grid`, ending at the noise level step `end` starts from (a base model handing its
    latents to a refiner: diffusers' `denoising_end`)."""
    if not 0 < end <= grid_length(grid):
        raise ValueError(f"end step {end}: expected 1 to {grid_length(grid)}")
    if isinstance(grid, (SigmaGrid, FlowGrid)):
        return type(grid)(grid.sigmas[:end + 1], grid.init_noise_sigma)
    return grid[:end]


def grid_timesteps(grid: Grid, schedule: NoiseSchedule) -> list[float]:
    """The (possibly fractional) timestep at which each step of `grid` starts (σ's mapped back by log-σ
    interpolation, as diffusers' schedulers do for Karras σ's)."""
    if isinstance(grid, FlowGrid):
        return [t * schedule.num_timesteps for t in grid.sigmas[:-1]]
    if isinstance(grid, SigmaGrid):
        sigmas = torch.tensor(grid.sigmas[:-1], dtype=torch.float64)
        return sigma_to_t(sigmas, schedule.log_sigmas.double()).tolist()
    return [float(step.t) for step in grid]


def noised(grid: Grid, step: int, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Clean `latents` brought to the noise level at which step `step` of `grid` starts (its end, step = length:
    the latents themselves), in the sampler's own x: (1 − t) x_0 + t ε on a flow, x_0 + σ ε in σ-space, √ᾱ_t x_0 + √(1 − ᾱ_t) ε for the VP
    samplers (DDPM eq. 4; diffusers' `scheduler.add_noise`)."""
    if step == grid_length(grid):
        return latents
    if isinstance(grid, FlowGrid):  # the straight path
        return (1 - grid.sigmas[step]) * latents + grid.sigmas[step] * noise
    if isinstance(grid, SigmaGrid):
        return latents + grid.sigmas[step] * noise
    alpha_cumprod = grid[step].alpha_cumprod
    return alpha_cumprod**0.5 * latents + (1 - alpha_cumprod) ** 0.5 * noise
