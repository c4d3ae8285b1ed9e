"""Noise schedules of the discrete forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), and the grids samplers use.

Pure functions over float64 tensors (on the CPU; samplers read python floats from them). Two views of one process:
the variance-preserving (VP) one, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε with integer t ∈ [0, T), and the variance-exploding
one of k-diffusion (Karras et al. 2022), x = x_0 + σ ε with σ_t = √((1 − ᾱ_t) / ᾱ_t), so that x = x_t / √ᾱ_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from latent_diffusion.config import DiffusionConfig

BetaScheduleName = Literal["linear", "scaled_linear", "cosine"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaScheduleName)
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)

# ᾱ_T is floored here when σ is needed: a zero-terminal-SNR schedule has ᾱ_T = 0 and σ_T = ∞ (as diffusers).
MIN_ALPHA_CUMPROD = 2.0**-24


def _check_name(name: str, valid: tuple[str, ...], what: str) -> None:
    if name not in valid:
        raise ValueError(f"unknown {what} {name!r}; expected one of: {', '.join(valid)}")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's schedule (Ho et al. 2020, §4): β_t linear from β_1 to β_T."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """Latent/Stable Diffusion's schedule: √β_t linear from √β_1 to √β_T."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)."""
    step = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((step + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ_t so that √ᾱ_T = 0 (zero terminal SNR) while √ᾱ_1 is kept."""
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """β_t and ᾱ_t = ∏_{s≤t} (1 − β_s) for t = 0 … T−1 (index 0 is the paper's t = 1)."""

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,)

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or self.betas.shape != self.alphas_cumprod.shape:
            raise ValueError(f"betas and alphas_cumprod must be 1-D and of equal length, got "
                             f"{tuple(self.betas.shape)} and {tuple(self.alphas_cumprod.shape)}")

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        """The schedule with these β_t."""
        return cls(betas, torch.cumprod(1 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t) of the VE view, increasing in t."""
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()


def make_schedule(name: BetaScheduleName = "scaled_linear", num_timesteps: int = 1000, *,
                  zero_terminal_snr: bool = False, beta_range: tuple[float, float] | None = None) -> NoiseSchedule:
    """A named schedule over its standard β range or `beta_range` (β_1, β_T), optionally rescaled to zero
    terminal SNR."""
    _check_name(name, BETA_SCHEDULES, "beta schedule")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if beta_range is not None and name == "cosine":
        raise ValueError(f"beta_range = {beta_range}: the cosine schedule has no β range")
    betas = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}[name](
        num_timesteps, *(beta_range or ()))
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule.from_betas(betas)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ)/ᾱ), with ᾱ floored at 2⁻²⁴ so that a zero-terminal-SNR schedule keeps a finite σ_T."""
    abar = alphas_cumprod.clamp(min=MIN_ALPHA_CUMPROD)
    return ((1 - abar) / abar).sqrt()


def timestep_grid(num_steps: int, spacing: TimestepSpacing = "leading", num_timesteps: int = 1000,
                  steps_offset: int = 0) -> torch.Tensor:
    """Descending sampling timesteps (float64; fractional only for 'linspace'), as Lin et al. 2023, Table 2.

    'leading': k·⌊T/n⌋ + offset; 'trailing': round(T − k·T/n) − 1; 'linspace': n points from T − 1 to 0.
    """
    _check_name(spacing, TIMESTEP_SPACINGS, "timestep spacing")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the training timesteps), got {num_steps}")
    if spacing == "linspace":
        grid = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64)
    elif spacing == "leading":
        grid = torch.arange(num_steps, dtype=torch.float64) * (num_timesteps // num_steps) + steps_offset
    else:
        step = num_timesteps / num_steps
        grid = torch.tensor([round(num_timesteps - k * step) - 1 for k in range(num_steps)], dtype=torch.float64)
    grid = grid.sort(descending=True).values
    if grid[0] > num_timesteps - 1 or grid[-1] < 0:
        raise ValueError(f"steps_offset={steps_offset} puts the {spacing!r} grid of {num_steps} steps outside "
                         f"[0, {num_timesteps - 1}]")
    return grid


def interpolate(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table(t) by linear interpolation between integer timesteps (numpy.interp)."""
    t = t.clamp(0, table.shape[0] - 1)
    low = t.floor().long().clamp(max=table.shape[0] - 2)
    w = (t - low).to(table.dtype)
    return (1 - w) * table[low] + w * table[low + 1]


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of σ by linear interpolation in log σ (k-diffusion's DiscreteSchedule.sigma_to_t)."""
    log_sigmas = log_sigmas.to(sigma.device)
    log_sigma = sigma.clamp(min=1e-10).log().to(log_sigmas.dtype)
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
    w = (log_sigma.reshape(-1) - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return (low + w.clamp(0, 1)).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … n−1."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The noise schedule a model's `diffusion` config describes."""
    return make_schedule(cfg.schedule, cfg.num_timesteps, zero_terminal_snr=cfg.zero_terminal_snr,
                         beta_range=cfg.beta_range)
