"""Exponential moving average of weights (used for sampling): θ_ema ← d·θ_ema + (1 − d)·θ."""

from __future__ import annotations

import torch
from torch import nn

from latent_diffusion.training.state import distribute_like


class EMA(nn.Module):
    """EMA copy of a model's floating-point parameters; decay warms up as min(d, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        for i, name in enumerate(self.names):
            self.register_buffer(f"shadow_{i}", model.get_parameter(name).detach().clone().float())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current parameters."""
        decay = self.current_decay()
        shadows = [getattr(self, f"shadow_{i}") for i in range(len(self.names))]
        params = [model.get_parameter(name).detach().float() for name in self.names]
        torch._foreach_lerp_(shadows, params, 1.0 - decay)  # one fused kernel per dtype/device group
        self.num_updates += 1

    def averaged(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name, from this EMA or from its (gathered) `state_dict()`."""
        state = state if state is not None else self.state_dict()
        return {name: state[f"shadow_{i}"] for i, name in enumerate(self.names)}

    @torch.no_grad()
    def shard_like(self, model: nn.Module) -> None:
        """Lay the shadows out like `model`'s parameters (FSDP shards after `fully_shard(model)`)."""
        for i, name in enumerate(self.names):
            setattr(self, f"shadow_{i}", distribute_like(getattr(self, f"shadow_{i}"), model.get_parameter(name)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters into `model`."""
        for i, name in enumerate(self.names):
            param = model.get_parameter(name)
            param.copy_(getattr(self, f"shadow_{i}").to(param.dtype))
