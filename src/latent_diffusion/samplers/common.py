"""What every sampler shares: its call signature, noise draws, callbacks, the network's extra arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from latent_diffusion.diffusion.denoiser import Denoiser

# (step index, x after the step, x̂_0 of the step) → None, or the x to go on from instead (inpainting's blending)
Callback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
# One generator for the whole batch, or one per batch item (item k's noise from generator k, as diffusers' randn_tensor)
Generators = torch.Generator | Sequence[torch.Generator] | None


class Sampler(Protocol):
    """sample(denoiser, noise, grid, *, generator, callback, extra_args, **options) -> x̂_0 latents; `grid` as its
    registry entry's grid function builds it (`samplers/grid.py`)."""

    def __call__(self, denoiser: Denoiser, noise: torch.Tensor, grid: Any, *,
                 generator: Generators = None, callback: Callback | None = None,
                 extra_args: Mapping[str, Any] | None = None, **options: Any) -> torch.Tensor: ...


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


def report(callback: Callback | None, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Tell `callback` of step i; the x the sampler goes on from: the tensor the callback returns, else x."""
    replaced = None if callback is None else callback(i, x, denoised)
    return replaced if isinstance(replaced, torch.Tensor) else x


def model_kwargs(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if extra_args is None else dict(extra_args)
