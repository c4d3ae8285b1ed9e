"""What every sampler shares: argument checks, noise draws, the timestep and σ grids, the initial latents."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.schedule import (NoiseSchedule, TimestepSpacing, interpolate, karras_sigmas,
                                                 timestep_grid)

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, x after the step, x̂_0 of the step)
# One generator for the whole batch, or one per batch item (item k's noise from generator k, as diffusers' randn_tensor)
Generators = torch.Generator | Sequence[torch.Generator] | None


class Sampler(Protocol):
    """sample(denoiser, noise, num_steps, *, generator, callback, **options) -> x̂_0 latents."""

    def __call__(self, denoiser: Denoiser, noise: torch.Tensor, num_steps: int, *,
                 generator: Generators = None, callback: Callback | None = None,
                 **options: Any) -> torch.Tensor: ...


def check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn on the generator's device (as diffusers' randn_tensor);
    with one generator per batch item, item k's noise comes from generator k alone, whatever the batch."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: expected one per item")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_on = device if generator is None else generator.device
    return torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype).to(device)


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise of x's shape, dtype and device (see `randn`)."""
    return randn(x.shape, generator, x.device, x.dtype)


def report(callback: Callback | None, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def model_kwargs(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if extra_args is None else dict(extra_args)


class DiscreteStep(NamedTuple):
    """One step t → t_prev of a VP sampler: t_prev = −1 after the last step, where ᾱ_prev is the final ᾱ."""

    t: int
    t_prev: int
    alpha_cumprod: float
    alpha_cumprod_prev: float


def discrete_steps(schedule: NoiseSchedule, num_steps: int, spacing: TimestepSpacing, steps_offset: int,
                   final_alpha_cumprod: float) -> list[DiscreteStep]:
    """The integer timesteps of `timestep_grid` (rounded), each with the next one and their ᾱ."""
    check_num_steps(num_steps)
    ts = [int(t) for t in timestep_grid(num_steps, spacing, schedule.num_timesteps, steps_offset).round().tolist()]
    abar = schedule.alphas_cumprod.tolist()
    prevs = ts[1:] + [-1]
    return [DiscreteStep(t, p, abar[t], abar[p] if p >= 0 else final_alpha_cumprod)
            for t, p in zip(ts, prevs, strict=True)]


def sigma_grid(schedule: NoiseSchedule, num_steps: int, spacing: TimestepSpacing, steps_offset: int,
               karras: bool) -> list[float]:
    """σ_0 > … > σ_{n−1} > σ_n = 0 at the spaced timesteps (σ interpolated linearly, as diffusers' Euler schedulers).

    With `karras`, n σ's by Karras et al. eq. 5 between the first and last σ of the spaced grid.
    """
    check_num_steps(num_steps)
    t = timestep_grid(num_steps, spacing, schedule.num_timesteps, steps_offset)
    sigmas = interpolate(schedule.sigmas, t)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
    return sigmas.tolist() + [0.0]


def initial_latents(noise: torch.Tensor, sigma_max: float, vp_prior: bool) -> torch.Tensor:
    """x = noise·√(σ_max² + 1) (the VP prior x_T ~ N(0, I) seen as x_T/√ᾱ_T), or noise·σ_max (k-diffusion's).

    diffusers' Euler-family `init_noise_sigma` uses the first for 'leading' spacing and the second otherwise.
    """
    return noise * ((sigma_max**2 + 1) ** 0.5 if vp_prior else sigma_max)
