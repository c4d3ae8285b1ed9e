"""Condition dropout for classifier-free guidance training (Ho & Salimans 2022, §3.2): the model learns ε(x_t, ∅)
alongside ε(x_t, y) by seeing ∅ in place of each sample's condition with probability p_uncond."""

from __future__ import annotations

import torch

from latent_diffusion.conditioning.base import Conditioning


def drop_mask(batch_size: int, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples of a batch train unconditionally: (B,) bool, each True with probability `p_uncond`, from
    `batch_size` uniform draws of `generator`."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    return torch.rand(batch_size, generator=generator).lt(p_uncond)


def drop_condition(cond: Conditioning, null: Conditioning, drop: torch.Tensor) -> Conditioning:
    """Each sample's condition, or ∅ where `drop` (B,) is True; `null` holds one entry (batch 1), or one per
    sample (a vector condition's size features differ per sample)."""
    n = cond.batch_size
    drop = drop.to(cond.tokens.device)
    vector = None if null.vector is None else null.vector.expand(n, -1).to(cond.tokens.dtype)
    null = Conditioning(null.tokens.expand(n, -1, -1).to(cond.tokens.dtype), null.mask.expand(n, -1), vector=vector)
    both = Conditioning.cat([cond, null])
    tokens = torch.where(drop[:, None, None], both.tokens[n:], both.tokens[:n])
    mask = torch.where(drop[:, None], both.mask[n:], both.mask[:n])
    vector = None if both.vector is None else torch.where(drop[:, None], both.vector[n:], both.vector[:n])
    return Conditioning(tokens, mask, vector=vector)
