"""Samplers of the discrete VP process at integer timesteps: DDPM (ancestral), DDIM and PLMS.

Each takes unit-variance noise as x_T and the steps of a `discrete_grid`, and returns x̂_0 latents of its shape.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.samplers.common import Callback, Generators, model_kwargs, randn_like, report
from latent_diffusion.samplers.grid import DiscreteStep, discrete_grid
from latent_diffusion.samplers.registry import register

SPACED = ("spacing", "steps_offset")  # the grid options every discrete sampler takes


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (DDPM eq. 4 solved for x_0)."""
    return (x_t - (1 - alpha_cumprod) ** 0.5 * eps) / alpha_cumprod**0.5


def ddim_std(step: DiscreteStep, eta: float) -> float:
    """σ_t(η) = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}) (DDIM eq. 16)."""
    abar, abar_prev = step.alpha_cumprod, step.alpha_cumprod_prev
    return eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod_prev: float, std: float = 0.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z (DDIM eq. 12)."""
    x = alpha_cumprod_prev**0.5 * x0 + max(1 - alpha_cumprod_prev - std**2, 0.0) ** 0.5 * eps
    return x if noise is None else x + std * noise


def _ddim_loop(denoiser: Denoiser, x: torch.Tensor, steps: list[DiscreteStep], eta: float,
               generator: Generators, callback: Callback | None, extra: dict[str, Any]) -> torch.Tensor:
    for i, step in enumerate(steps):
        x0, eps = denoiser.predict(x, step.t, **extra)
        std = ddim_std(step, eta)
        x = ddim_update(x0, eps, step.alpha_cumprod_prev, std, randn_like(x, generator) if std > 0 else None)
        x = report(callback, i, x, x0)
    return x


@register("ddpm", discrete_grid, SPACED)
def sample_ddpm(denoiser: Denoiser, noise: torch.Tensor, grid: list[DiscreteStep], *,
                generator: Generators = None, callback: Callback | None = None,
                extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Ancestral sampling from p(x_{t−1} | x_t) with variance β̃_t (Ho et al. 2020, eq. 6–7), on a grid of
    timesteps (all T of them is DDPM itself; β_t = 1 − ᾱ_t/ᾱ_prev between grid points; ᾱ = 1 after the last).

    This is DDIM with η = 1: its mean √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − β̃_t) ε̂ equals the posterior mean μ̃_t.
    """
    return _ddim_loop(denoiser, noise, grid, 1.0, generator, callback, model_kwargs(extra_args))


@register("ddim", discrete_grid, SPACED + ("set_alpha_to_one",), options=("eta",))
def sample_ddim(denoiser: Denoiser, noise: torch.Tensor, grid: list[DiscreteStep], *,
                generator: Generators = None, callback: Callback | None = None, eta: float = 0.0,
                extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021); η = 0 is deterministic. Stepping to the next grid timestep equals diffusers'
    t − ⌊T/n⌋ for 'leading' spacing."""
    return _ddim_loop(denoiser, noise, grid, eta, generator, callback, model_kwargs(extra_args))


def _adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """ε' from the last 1-4 ε's, newest last (PNDM eq. 12, with lower orders while it warms up)."""
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def _transfer(x: torch.Tensor, eps: torch.Tensor, step: DiscreteStep) -> torch.Tensor:
    """PNDM's transfer φ(x_t, ε, t, t−δ) (eq. 9), which is DDIM's η = 0 step."""
    return ddim_update(x0_from_eps(x, eps, step.alpha_cumprod), eps, step.alpha_cumprod_prev)


@register("plms", functools.partial(discrete_grid, set_alpha_to_one=False), SPACED + ("set_alpha_to_one",))
def sample_plms(denoiser: Denoiser, noise: torch.Tensor, grid: list[DiscreteStep], *,
                generator: Generators = None, callback: Callback | None = None,
                extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """PLMS: PNDM's pseudo linear multistep method (Liu et al. 2022) without Runge–Kutta warm-up (diffusers'
    skip_prk_steps, CompVis' PLMSSampler). Uses len(grid) + 1 network evaluations."""
    extra = model_kwargs(extra_args)
    history: list[torch.Tensor] = []
    x = noise
    for i, step in enumerate(grid):
        x0, eps = denoiser.predict(x, step.t, **extra)
        history = (history + [eps])[-4:]
        if i == 0 and step.t_prev >= 0:
            # First step: pseudo improved Euler, ε' = (ε(x_t, t) + ε(φ(x_t, ε, t, t−δ), t−δ)) / 2.
            eps_next = denoiser.eps(_transfer(x, eps, step), step.t_prev, **extra)
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = _adams_bashforth(history)
        x = _transfer(x, eps_prime, step)
        x = report(callback, i, x, x0)
    return x
