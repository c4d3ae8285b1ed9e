"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022; SD3: Esser et al. 2024): the straight path
x_t = (1 − t)·x_0 + t·ε from data (t = 0) to noise (t = 1), and a network that predicts its velocity
v = dx_t/dt = ε − x_0, trained with t drawn logit-normal (SD3 §3.1) and sampled by integrating the ODE from t = 1.

Seen from the samplers, t is a σ: x_0 = x_t − t·v is the denoised estimate D(x; σ = t), and k-diffusion's Euler
and Heun steps on D are exactly the flow ODE's, so they serve as the flow samplers over a `FlowGrid` (diffusers'
FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler). The network reads the timestep 1000·t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class FlowSchedule:
    """The flow's time scale: timestep = num_timesteps·t, and the samplers' shift s (t' = s·t / (1 + (s − 1)·t);
    SD3 uses 3 to spend more steps at high noise)."""

    num_timesteps: int = 1000
    shift: float = 1.0

    def shifted(self, t: np.ndarray) -> np.ndarray:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sigmas(self, num_steps: int) -> list[float]:
        """n times from 1 down to the shifted 1/T, then 0 (diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps:
        n timesteps spaced between those of the shifted ends, divided by T, shifted again)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        n = self.num_timesteps
        table = self.shifted(np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n)  # as the scheduler's init
        timesteps = np.linspace(table[0] * n, table[-1] * n, num_steps, dtype=np.float32)
        return [float(s) for s in self.shifted(timesteps / n)] + [0.0]


@dataclass(frozen=True)
class FlowDenoiser:
    """D(x; t) = x − t·v(x, 1000·t) for a network `model(x, timestep, **extra)` predicting the flow velocity."""

    model: Callable[..., torch.Tensor]
    schedule: FlowSchedule

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, **extra: Any) -> torch.Tensor:
        t = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        velocity = self.model(x, t * self.schedule.num_timesteps, **extra)
        return x - t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * velocity


def logit_normal(n: int, generator: torch.Generator | None = None, mean: float = 0.0,
                 std: float = 1.0) -> torch.Tensor:
    """n times t = sigmoid(u), u ~ N(mean, std²): SD3's training-time distribution (§3.1, "logit-normal"), which
    puts more weight on the middle of the path than a uniform t."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """E‖(ε − x_0) − v_θ((1 − t)·x_0 + t·ε, T·t)‖² (conditional flow matching), per-sample means averaged."""
    tt = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - tt) * x0 + tt * noise
    prediction = model(x_t, t.float() * num_timesteps)
    per_sample = (prediction.float() - (noise - x0).float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    return per_sample.mean()
