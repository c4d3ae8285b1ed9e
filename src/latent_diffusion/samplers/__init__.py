"""Stateless samplers over a `Denoiser` (k-diffusion style) and their name registry.

Every sampler is `sample_x(denoiser, noise, num_steps, *, generator=None, callback=None, **options) -> x̂_0`,
takes unit-variance noise of any shape (B, C, H, W), and draws further randomness only from `generator` (one, or
one per batch item: then each item's result depends on its own generator alone).
"""

from __future__ import annotations

import inspect

from latent_diffusion.samplers.common import Callback, Generators, Sampler
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


# AUTOMATIC1111's names of our samplers (its "X Karras" variants are X with `karras=True`); DDPM has none
A1111_NAMES = {"euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "ddim": "DDIM", "plms": "PLMS",
               "dpmpp_2m": "DPM++ 2M"}
_BY_NAME = {**{name: name for name in SAMPLERS}, **{a1111.lower(): name for name, a1111 in A1111_NAMES.items()}}
# Arguments every sampler takes; the rest of its keywords are its options (eta, karras, spacing, ...)
_COMMON_ARGUMENTS = {"denoiser", "noise", "num_steps", "generator", "callback", "extra_args"}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword options the sampler `name` takes (e.g. ddim: eta, spacing, steps_offset, set_alpha_to_one)."""
    return tuple(p for p in inspect.signature(get_sampler(name)).parameters if p not in _COMMON_ARGUMENTS)


def resolve_sampler(name: str) -> tuple[str, bool]:
    """(registered name, Karras σ's) of a registered or an AUTOMATIC1111 sampler name, in any case: 'Euler a' →
    ('euler_a', False), 'DPM++ 2M Karras' → ('dpmpp_2m', True)."""
    text = " ".join(name.lower().split())
    karras = text.endswith(" karras")
    found = _BY_NAME.get(text.removesuffix(" karras"))
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


__all__ = ["A1111_NAMES", "SAMPLERS", "Callback", "Generators", "Sampler", "get_sampler", "resolve_sampler",
           "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_euler", "sample_euler_a", "sample_heun",
           "sample_plms", "sampler_label", "sampler_options"]
