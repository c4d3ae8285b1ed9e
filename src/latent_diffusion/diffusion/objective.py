"""The training objective of the diffusion model (DDPM eq. 14; LDM eq. 2), with v/x0 targets and min-SNR weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from latent_diffusion.diffusion.denoiser import PredictionType


def _expand(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4)."""
    abar = _expand(alphas_cumprod.to(x0.device)[t].to(x0.dtype), x0.ndim)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def training_target(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                    prediction_type: PredictionType) -> torch.Tensor:
    """ε, v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022), or x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = _expand(alphas_cumprod.to(x0.device)[t].to(x0.dtype), x0.ndim)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float | None,
                   prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ) expressed for the chosen target; 1 when γ is None."""
    if gamma is None:
        return torch.ones(t.shape, device=t.device)
    abar = alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: PredictionType = "epsilon",
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """E‖target − model(x_t, t)‖², per-sample means weighted by min-SNR, averaged over the batch."""
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    prediction = model(x_t, t.float())
    target = training_target(x0, t, noise, alphas_cumprod, prediction_type)
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    return (min_snr_weight(t, alphas_cumprod, min_snr_gamma, prediction_type) * per_sample).mean()
