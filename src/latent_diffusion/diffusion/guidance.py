"""Classifier-free guidance (Ho & Salimans 2022), in one place: ε̃ = ε(∅) + w·(ε(y) − ε(∅)). The condition dropout
that trains ε(∅) is `conditioning/dropout.py`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from latent_diffusion.conditioning.base import Conditioning

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def network_kwargs(cond: Conditioning) -> dict:
    """Keyword arguments of `UNetModel.forward` for a condition (its extra streams' tokens and its vector
    condition where it has them)."""
    kwargs = {"context": cond.tokens, "context_mask": cond.mask}
    if cond.vector is not None:
        kwargs["vector"] = cond.vector
    return {**kwargs, "extra_context": dict(cond.extra)} if cond.extra else kwargs


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15–16): match the std of the conditional prediction, blend by φ."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guided_model(network: Callable[..., torch.Tensor], cond: Conditioning, uncond: Conditioning, scale: float,
                 rescale: float = 0.0) -> ModelFn:
    """A model function (x_t, t) → prediction applying CFG with one batched forward for both branches.

    `uncond` is ∅ (or a negative prompt). w = 1 is the conditional model, w = 0 the unconditional one.
    """
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if scale == 1.0:
        return lambda x, t: network(x, t, **network_kwargs(cond))
    if scale == 0.0:
        return lambda x, t: network(x, t, **network_kwargs(uncond))
    both = network_kwargs(Conditioning.cat([uncond, cond]))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = network(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # ∅ then y
        guided = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, rescale) if rescale > 0 else guided

    return model
