"""Samplers by name: each registers itself, with the grid function that places its steps, where it is defined.

Adding a sampler is one function in one file, decorated with `@register(name, grid, grid_options, options)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from latent_diffusion.diffusion.schedule import NoiseSchedule
from latent_diffusion.samplers.common import Sampler
from latent_diffusion.samplers.grid import GridOptions

GRID_OPTIONS: tuple[str, ...] = ("spacing", "steps_offset", "karras", "set_alpha_to_one")  # fields of GridOptions


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, the grid function that places its steps, and the options each takes.

    :param sample: `sample(denoiser, noise, grid, *, generator, callback, extra_args, **options) -> x̂_0`.
    :param grid: `grid(schedule, num_steps, **grid_options) -> grid`, the grid `sample` takes.
    :param grid_options: the `GridOptions` fields `grid` takes.
    :param options: the sampler's own keyword options (e.g. eta).
    :param objective: the models it samples: "diffusion" (the VP process) or "flow" (`diffusion.flow`).
    """

    name: str
    sample: Sampler
    grid: Callable[..., Any]
    grid_options: tuple[str, ...]
    options: tuple[str, ...] = ()
    objective: str = "diffusion"

    def make_grid(self, schedule: NoiseSchedule, num_steps: int, options: GridOptions | None = None) -> Any:
        """This sampler's grid of `num_steps` steps: the options its grid takes, None ones at their defaults (a
        model's spacing or last ᾱ is for the samplers that have one); Karras σ's where it has none are an error."""
        options = options or GridOptions()
        if options.karras and "karras" not in self.grid_options:
            raise ValueError(f"sampler {self.name} has no Karras σ spacing")
        given = {key: getattr(options, key) for key in self.grid_options if getattr(options, key) is not None}
        return self.grid(schedule, num_steps, **given)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(name: str, grid: Callable[..., Any], grid_options: tuple[str, ...],
             options: tuple[str, ...] = (), objective: str = "diffusion") -> Callable[[Sampler], Sampler]:
    """Register the decorated sampler as `name`, its steps placed by `grid` (see `SamplerSpec`)."""
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is registered already")
    unknown = [key for key in grid_options if key not in GRID_OPTIONS]
    if unknown:
        raise ValueError(f"sampler {name!r}: unknown grid options {unknown}; expected some of {list(GRID_OPTIONS)}")

    def add(sample: Sampler) -> Sampler:
        SAMPLERS[name] = SamplerSpec(name, sample, grid, grid_options, options, objective)
        return sample
    return add
