"""Sinusoidal timestep embeddings (Vaswani et al. 2017; DDPM's UNet) and 2-D grid position codes."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·ω_k), sin(t·ω_k)] with ω_k = max_period^(−k/half), k < dim/2; t may be fractional. (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def grid_position_embedding(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """2-D sinusoidal codes of an h×w grid's cells on normalised coordinates (cell centres in (0, 1)): a quarter
    of the channels each for cos/sin of y and of x at frequencies π·2^(6k/(n−1)), k < n = dim/4 (the rest zero).
    The same place in the image gets the same code at any resolution. → (h·w, dim)."""
    n = dim // 4
    freqs = math.pi * 2 ** (torch.arange(n, dtype=torch.float32, device=device) * 6 / max(1, n - 1))
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    ay, ax = (y[:, None] * freqs)[:, None, :], (x[:, None] * freqs)[None, :, :]  # (h, 1, n), (1, w, n)
    shape = (height, width, n)
    emb = torch.cat([ay.cos().expand(shape), ay.sin().expand(shape), ax.cos().expand(shape),
                     ax.sin().expand(shape)], dim=-1).reshape(height * width, 4 * n)
    if dim > 4 * n:
        emb = torch.cat([emb, emb.new_zeros(height * width, dim - 4 * n)], dim=-1)
    return emb.to(dtype) if dtype is not None else emb
