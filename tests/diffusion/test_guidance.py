"""Classifier-free guidance: the identities at w = 0, 1 and w, in one batched forward, and the guidance rescale."""

import pytest
import torch

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.diffusion.guidance import guided_model, network_kwargs


def _network(x, t, context=None, context_mask=None, class_labels=None):
    """A toy network whose output depends on x, t and the masked mean of the context tokens."""
    weights = context_mask.float()[:, :, None]
    pooled = (context * weights).sum(1) / weights.sum(1)  # (B, D)
    return torch.sin(x) * pooled[:, :x.shape[1], None, None] + 0.01 * t[:, None, None, None]


def _conditions():
    torch.manual_seed(0)
    cond = Conditioning(torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    uncond = Conditioning(torch.randn(2, 2, 4), torch.ones(2, 2, dtype=torch.bool))
    return cond, uncond


def test_guidance_identities():
    cond, uncond = _conditions()
    x, t = torch.randn(2, 4, 3, 5), torch.tensor([10.0, 20.0])
    plain_cond = _network(x, t, **network_kwargs(cond))
    plain_uncond = _network(x, t, **network_kwargs(uncond))
    assert torch.equal(guided_model(_network, cond, uncond, 1.0)(x, t), plain_cond)
    assert torch.equal(guided_model(_network, cond, uncond, 0.0)(x, t), plain_uncond)
    guided = guided_model(_network, cond, uncond, 7.5)(x, t)  # one batched forward, padded tokens masked
    assert torch.allclose(guided, plain_uncond + 7.5 * (plain_cond - plain_uncond), atol=1e-5)


def test_guidance_rescale_matches_conditional_std():
    cond, uncond = _conditions()
    x, t = torch.randn(2, 4, 3, 5), torch.tensor([10.0, 20.0])
    out = guided_model(_network, cond, uncond, 7.5, rescale=1.0)(x, t)
    ref = _network(x, t, **network_kwargs(cond))
    assert torch.allclose(out.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)), rtol=1e-4)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        guided_model(_network, cond, uncond, -1.0)
