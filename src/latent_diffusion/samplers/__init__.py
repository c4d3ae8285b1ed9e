"""Stateless samplers over a `Denoiser` (k-diffusion style), the grids that place their steps, and their registry.

A sampler is `sample_x(denoiser, noise, grid, *, generator=None, callback=None, extra_args=None, **options)`
-> x̂_0: it takes unit-variance noise of any shape (B, C, H, W) and the grid its registry entry builds
(`get_sampler(name).make_grid(schedule, num_steps, GridOptions(...))`), and draws further randomness only from
`generator` (one, or one per batch item: then each item's result depends on its own generator alone).
"""

from __future__ import annotations

from latent_diffusion.samplers.common import Callback, Generators, Sampler
from latent_diffusion.samplers.grid import DiscreteStep, FlowGrid, GridOptions, SigmaGrid
# Importing the sampler modules registers their samplers, in this order
from latent_diffusion.samplers.discrete import sample_ddim, sample_ddpm, sample_plms
from latent_diffusion.samplers.kdiffusion import sample_dpmpp_2m, sample_euler, sample_euler_a, sample_heun
from latent_diffusion.samplers.flow import sample_flow_euler, sample_flow_heun
from latent_diffusion.samplers.registry import SAMPLERS, SamplerSpec, register

# AUTOMATIC1111's names of our samplers (its "X Karras" variants are X with `karras=True`); DDPM has none
A1111_NAMES = {"euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "ddim": "DDIM", "plms": "PLMS",
               "dpmpp_2m": "DPM++ 2M"}


def get_sampler(name: str) -> SamplerSpec:
    """The sampler registered under `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword options the sampler `name` takes, its own and its grid's (e.g. ddim: eta, spacing,
    steps_offset, set_alpha_to_one), as its registry entry declares them."""
    spec = get_sampler(name)
    return spec.options + spec.grid_options


def resolve_sampler(name: str) -> tuple[str, bool]:
    """(registered name, Karras σ's) of a registered or an AUTOMATIC1111 sampler name, in any case: 'Euler a' →
    ('euler_a', False), 'DPM++ 2M Karras' → ('dpmpp_2m', True)."""
    text = " ".join(name.lower().split())
    karras = text.endswith(" karras")
    by_name = {**{n: n for n in SAMPLERS}, **{a1111.lower(): n for n, a1111 in A1111_NAMES.items()}}
    found = by_name.get(text.removesuffix(" karras"))
    with_karras = [n for n in SAMPLERS if "karras" in sampler_options(n)]
    if found is None:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))} (or "
                         f"AUTOMATIC1111's names, in any case: {', '.join(A1111_NAMES.values())}, and "
                         f"'<name> Karras' for {', '.join(sampler_label(n) for n in with_karras)})")
    if karras and found not in with_karras:
        raise ValueError(f"sampler {name!r}: {found} has no Karras σ spacing (samplers with one: "
                         f"{', '.join(with_karras)})")
    return found, karras


def sampler_label(name: str, karras: bool = False) -> str:
    """The AUTOMATIC1111 name of a registered sampler (its own name where A1111 has none), 'DPM++ 2M Karras' style."""
    label = A1111_NAMES.get(name, name)
    return f"{label} Karras" if karras else label


__all__ = ["A1111_NAMES", "SAMPLERS", "Callback", "DiscreteStep", "FlowGrid", "Generators", "GridOptions", "Sampler",
           "SamplerSpec", "SigmaGrid", "get_sampler", "register", "resolve_sampler", "sample_ddim", "sample_ddpm",
           "sample_dpmpp_2m", "sample_euler", "sample_euler_a", "sample_flow_euler", "sample_flow_heun",
           "sample_heun", "sample_plms", "sampler_label", "sampler_options"]
