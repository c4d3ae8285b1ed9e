"""The denoiser: a network trained on the discrete VP process, seen as ε(x_t, t), x̂_0(x_t, t) or D(x; σ)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from latent_diffusion.diffusion.schedule import NoiseSchedule, sigma_to_t

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)

ModelFn = Callable[..., torch.Tensor]  # model(x_t, t, **extra) -> prediction, t a float32 (B,) tensor


def _per_sample(values: torch.Tensor | float, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or (B,) tensor as a (B,) tensor on x's device."""
    values = torch.as_tensor(values, device=x.device, dtype=dtype)
    return values.expand(x.shape[0]) if values.ndim == 0 else values


def _expand(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))  # (B,) -> (B, 1, ..., 1)


@dataclass(frozen=True)
class Denoiser:
    """Wraps `model(x_t, t, **extra)` trained on `schedule` to predict ε, v = √ᾱ ε − √(1−ᾱ) x_0, or x_0.

    :param model: the network function; t is passed as a float32 tensor of shape (B,).
    :param schedule: the forward process the network was trained on.
    :param prediction_type: what the network predicts.
    :param quantize: in `denoise`, round the timestep of σ to the nearest integer (k-diffusion's `quantize`;
        diffusers' DPMSolverMultistepScheduler does this for Karras sigmas).
    """

    model: ModelFn
    schedule: NoiseSchedule
    prediction_type: PredictionType = "epsilon"
    quantize: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; "
                             f"expected one of: {', '.join(PREDICTION_TYPES)}")

    def _x0_and_eps(self, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the network output at x_t = α x_0 + σ ε (VP: α² + σ² = 1)."""
        if self.prediction_type == "epsilon":
            return (x_t - sigma * out) / alpha, out
        if self.prediction_type == "v_prediction":  # Salimans & Ho 2022, §4: x_0 = α x_t − σ v, ε = σ x_t + α v
            return alpha * x_t - sigma * out, sigma * x_t + alpha * out
        return out, (x_t - alpha * out) / sigma

    def predict(self, x_t: torch.Tensor, t: int | torch.Tensor, **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) at integer timestep(s) t (an int or a (B,) tensor), one network evaluation."""
        t = _per_sample(t, x_t, torch.long)
        abar = _expand(self.schedule.alphas_cumprod.to(x_t.device)[t], x_t.ndim)
        out = self.model(x_t, t.to(torch.float32), **extra)
        return self._x0_and_eps(out, x_t, abar.sqrt().to(x_t.dtype), (1 - abar).sqrt().to(x_t.dtype))

    def eps(self, x_t: torch.Tensor, t: int | torch.Tensor, **extra: Any) -> torch.Tensor:
        """ε̂(x_t, t) of the discrete VP process."""
        return self.predict(x_t, t, **extra)[1]

    def x0(self, x_t: torch.Tensor, t: int | torch.Tensor, **extra: Any) -> torch.Tensor:
        """x̂_0(x_t, t) of the discrete VP process."""
        return self.predict(x_t, t, **extra)[0]

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, **extra: Any) -> torch.Tensor:
        """D(x; σ) ≈ E[x_0 | x] for x = x_0 + σ ε: the network sees x/√(σ²+1) at the timestep of σ."""
        sigma = _per_sample(sigma, x, torch.promote_types(x.dtype, torch.float32))  # σ and c_in in fp32 at least
        t = sigma_to_t(sigma, self.schedule.log_sigmas)
        t = t.round() if self.quantize else t
        c_in = _expand((sigma**2 + 1).rsqrt(), x.ndim)  # x_t = √ᾱ x = x/√(σ²+1)
        x_t = x * c_in
        out = self.model(x_t, t.to(torch.float32), **extra)
        return self._x0_and_eps(out, x_t, c_in, _expand(sigma, x.ndim) * c_in)[0]
