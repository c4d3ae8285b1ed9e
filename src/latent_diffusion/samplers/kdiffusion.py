"""Samplers in σ-space, x = x_0 + σ ε, over the denoiser D(x; σ) (Karras et al. 2022; k-diffusion).

Each takes unit-variance noise and a `SigmaGrid`, and scales the noise to the first σ itself (the grid's
`init_noise_sigma`), so callers never multiply by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import torch

from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.samplers.common import Callback, Generators, model_kwargs, randn_like, report
from latent_diffusion.samplers.grid import SigmaGrid, dpm_solver_grid, sigma_grid
from latent_diffusion.samplers.registry import register

SPACED = ("spacing", "steps_offset", "karras")  # the grid options every σ-space sampler takes


def euler_update(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x + (σ_next − σ)·d with d = (x − D(x; σ))/σ, the probability-flow ODE dx/dσ (Karras et al. Alg. 1, l. 3–4)."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next², σ_up² = η² σ_next² (σ² − σ_next²)/σ² (DDIM eq. 16 in σ-space)."""
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


@register("euler", sigma_grid, SPACED)
def sample_euler(denoiser: Denoiser, noise: torch.Tensor, grid: SigmaGrid, *,
                 generator: Generators = None, callback: Callback | None = None,
                 extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the correction): the η = 0
    case of ancestral Euler, where σ_down = σ_{i+1} and no noise is added."""
    return sample_euler_a(denoiser, noise, grid, generator=generator, callback=callback, eta=0.0,
                          extra_args=extra_args)


@register("euler_a", sigma_grid, SPACED, options=("eta",))
def sample_euler_a(denoiser: Denoiser, noise: torch.Tensor, grid: SigmaGrid, *,
                   generator: Generators = None, callback: Callback | None = None, eta: float = 1.0,
                   extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Ancestral Euler (k-diffusion): an Euler step down to σ_down, then fresh noise of std σ_up."""
    x, extra = noise * grid.init_noise_sigma, model_kwargs(extra_args)
    for i, (sigma, sigma_next) in enumerate(pairwise(grid.sigmas)):
        denoised = denoiser.denoise(x, sigma, **extra)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        x = euler_update(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        x = report(callback, i, x, denoised)
    return x


@register("heun", sigma_grid, SPACED)
def sample_heun(denoiser: Denoiser, noise: torch.Tensor, grid: SigmaGrid, *,
                generator: Generators = None, callback: Callback | None = None,
                extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); 2n − 1 network evaluations for n steps."""
    x, extra = noise * grid.init_noise_sigma, model_kwargs(extra_args)
    for i, (sigma, sigma_next) in enumerate(pairwise(grid.sigmas)):
        denoised = denoiser.denoise(x, sigma, **extra)
        x_next = euler_update(x, denoised, sigma, sigma_next)
        if sigma_next > 0:
            # Alg. 1, l. 6–7: x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d'_i)/2, d'_i taken at the Euler estimate.
            denoised_next = denoiser.denoise(x_next, sigma_next, **extra)
            d_mean = ((x - denoised) / sigma + (x_next - denoised_next) / sigma_next) / 2
            x_next = x + (sigma_next - sigma) * d_mean
        x = x_next
        x = report(callback, i, x, denoised)
    return x


@register("dpmpp_2m", dpm_solver_grid, SPACED)
def sample_dpmpp_2m(denoiser: Denoiser, noise: torch.Tensor, grid: SigmaGrid, *,
                    generator: Generators = None, callback: Callback | None = None,
                    extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in λ = −log σ (the half log-SNR); first-order first and last step.

    diffusers rounds the timesteps of Karras σ's: build the denoiser with `quantize=True` to match it.
    """
    x, extra = noise * grid.init_noise_sigma, model_kwargs(extra_args)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(pairwise(grid.sigmas)):
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
        x = report(callback, i, x, denoised)
    return x
