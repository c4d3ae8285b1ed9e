"""Stateless samplers over a `Denoiser` (k-diffusion style) and their name registry.

Every sampler is `sample_x(denoiser, noise, num_steps, *, generator=None, callback=None, **options) -> x̂_0`,
takes unit-variance noise of any shape (B, C, H, W), and draws further randomness only from `generator`.
"""

from __future__ import annotations

from latent_diffusion.samplers.common import Callback, Sampler
from latent_diffusion.samplers.discrete import sample_ddim, sample_ddpm, sample_plms
from latent_diffusion.samplers.kdiffusion import sample_dpmpp_2m, sample_euler, sample_euler_a, sample_heun

SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "Callback", "Sampler", "get_sampler", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_euler", "sample_euler_a", "sample_heun", "sample_plms"]
