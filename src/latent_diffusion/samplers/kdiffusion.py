"""Samplers in σ-space, x = x_0 + σ ε, over the denoiser D(x; σ) (Karras et al. 2022; k-diffusion).

Each takes unit-variance noise and scales it to the first σ itself (see `initial_latents`), so callers never
multiply by an `init_noise_sigma`. Grid options default to those of the corresponding diffusers scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import torch

from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.schedule import TimestepSpacing, interpolate, karras_sigmas, timestep_grid
from latent_diffusion.samplers.common import (Callback, Generators, check_num_steps, initial_latents, model_kwargs,
                                              randn_like, report, sigma_grid)


def euler_update(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x + (σ_next − σ)·d with d = (x − D(x; σ))/σ, the probability-flow ODE dx/dσ (Karras et al. Alg. 1, l. 3–4)."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next², σ_up² = η² σ_next² (σ² − σ_next²)/σ² (DDIM eq. 16 in σ-space)."""
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _start(denoiser: Denoiser, noise: torch.Tensor, num_steps: int, spacing: TimestepSpacing, steps_offset: int,
           karras: bool, extra_args: Mapping[str, Any] | None) -> tuple[list[tuple[float, float]], torch.Tensor, dict]:
    """An Euler-family sampler's steps (σ_i, σ_{i+1}), its initial x (as diffusers' init_noise_sigma) and kwargs."""
    sigmas = sigma_grid(denoiser.schedule, num_steps, spacing, steps_offset, karras)
    return list(pairwise(sigmas)), initial_latents(noise, sigmas[0], spacing == "leading"), model_kwargs(extra_args)


def sample_euler(denoiser: Denoiser, noise: torch.Tensor, num_steps: int, *,
                 generator: Generators = None, callback: Callback | None = None,
                 spacing: TimestepSpacing = "linspace", steps_offset: int = 0, karras: bool = False,
                 extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the correction): the η = 0
    case of ancestral Euler, where σ_down = σ_{i+1} and no noise is added."""
    return sample_euler_a(denoiser, noise, num_steps, generator=generator, callback=callback, eta=0.0,
                          spacing=spacing, steps_offset=steps_offset, karras=karras, extra_args=extra_args)


def sample_euler_a(denoiser: Denoiser, noise: torch.Tensor, num_steps: int, *,
                   generator: Generators = None, callback: Callback | None = None, eta: float = 1.0,
                   spacing: TimestepSpacing = "linspace", steps_offset: int = 0, karras: bool = False,
                   extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Ancestral Euler (k-diffusion): an Euler step down to σ_down, then fresh noise of std σ_up."""
    steps, x, extra = _start(denoiser, noise, num_steps, spacing, steps_offset, karras, extra_args)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoiser.denoise(x, sigma, **extra)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        x = euler_update(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        report(callback, i, x, denoised)
    return x


def sample_heun(denoiser: Denoiser, noise: torch.Tensor, num_steps: int, *,
                generator: Generators = None, callback: Callback | None = None,
                spacing: TimestepSpacing = "linspace", steps_offset: int = 0, karras: bool = False,
                extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); 2·num_steps − 1 network evaluations."""
    steps, x, extra = _start(denoiser, noise, num_steps, spacing, steps_offset, karras, extra_args)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoiser.denoise(x, sigma, **extra)
        x_next = euler_update(x, denoised, sigma, sigma_next)
        if sigma_next > 0:
            # Alg. 1, l. 6–7: x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d'_i)/2, d'_i taken at the Euler estimate.
            denoised_next = denoiser.denoise(x_next, sigma_next, **extra)
            d_mean = ((x - denoised) / sigma + (x_next - denoised_next) / sigma_next) / 2
            x_next = x + (sigma_next - sigma) * d_mean
        x = x_next
        report(callback, i, x, denoised)
    return x


def dpm_solver_sigmas(denoiser: Denoiser, num_steps: int, spacing: TimestepSpacing, steps_offset: int,
                      karras: bool) -> list[float]:
    """DPM-Solver's grid (as diffusers' DPMSolverMultistepScheduler): n + 1 spaced timesteps with the last one
    dropped ('trailing': n), or n Karras σ's over the whole table; then σ = 0."""
    check_num_steps(num_steps)
    schedule = denoiser.schedule
    if karras:
        sigmas = karras_sigmas(schedule.sigmas[0].item(), schedule.sigmas[-1].item(), num_steps)
    else:
        if spacing == "trailing":
            t = timestep_grid(num_steps, spacing, schedule.num_timesteps, steps_offset)
        else:
            t = timestep_grid(num_steps + 1, spacing, schedule.num_timesteps, steps_offset)[:-1].round()
        sigmas = interpolate(schedule.sigmas, t)
    return sigmas.tolist() + [0.0]


def sample_dpmpp_2m(denoiser: Denoiser, noise: torch.Tensor, num_steps: int, *,
                    generator: Generators = None, callback: Callback | None = None,
                    spacing: TimestepSpacing = "linspace", steps_offset: int = 0, karras: bool = False,
                    extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in λ = −log σ (the half log-SNR); first-order first and last step.

    diffusers rounds the timesteps of Karras σ's: build the denoiser with `quantize=True` to match it.
    """
    sigmas = dpm_solver_sigmas(denoiser, num_steps, spacing, steps_offset, karras)
    x, extra = initial_latents(noise, sigmas[0], vp_prior=True), model_kwargs(extra_args)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        denoised = denoiser.denoise(x, sigma, **extra)
        if sigma_next == 0:
            x = denoised  # the update's limit as h → ∞
        else:
            h = math.log(sigma / sigma_next)  # h_i = λ_{t_i} − λ_{t_{i−1}}
            d = denoised
            if old_denoised is not None:
                # D_i = (1 + 1/(2 r_i)) x̂_0(t_{i−1}) − 1/(2 r_i) x̂_0(t_{i−2}), r_i = h_{i−1}/h_i (Alg. 2)
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            # x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x̃_{t_{i−1}} − α_{t_i}(e^{−h_i} − 1) D_i, divided by α_{t_i}
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        report(callback, i, x, denoised)
    return x
