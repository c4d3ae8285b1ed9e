"""The flow samplers: the flow ODE dx/dt = v integrated from t = 1 (noise) to 0 over a `FlowGrid`. With
D(x; t) = x − t·v (`diffusion.flow.FlowDenoiser`), k-diffusion's Euler and Heun updates are the flow's own:
(x − D)/t = v. They equal diffusers' FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from latent_diffusion.samplers.common import Callback, Generators
from latent_diffusion.samplers.grid import FlowGrid, flow_grid
from latent_diffusion.samplers.kdiffusion import sample_euler, sample_heun
from latent_diffusion.samplers.registry import register


@register("flow_euler", flow_grid, (), objective="flow")
def sample_flow_euler(denoiser, noise: torch.Tensor, grid: FlowGrid, *, generator: Generators = None,
                      callback: Callback | None = None, extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Euler: x_{i+1} = x_i + (t_{i+1} − t_i)·v̂(x_i, t_i) (SD3's sampler)."""
    return sample_euler(denoiser, noise, grid, generator=generator, callback=callback, extra_args=extra_args)


@register("flow_heun", flow_grid, (), objective="flow")
def sample_flow_heun(denoiser, noise: torch.Tensor, grid: FlowGrid, *, generator: Generators = None,
                     callback: Callback | None = None, extra_args: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Heun: the Euler step corrected by the mean of the velocities at both ends (2n − 1 evaluations)."""
    return sample_heun(denoiser, noise, grid, generator=generator, callback=callback, extra_args=extra_args)
