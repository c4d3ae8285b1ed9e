"""Classifier-free guidance identities, condition dropout, the training objective and EMA."""

import pytest
import torch

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.diffusion.guidance import drop_condition, guided_model, network_kwargs
from latent_diffusion.diffusion.objective import diffusion_loss, min_snr_weight, q_sample, training_target
from latent_diffusion.training.ema import EMA
from latent_diffusion.unet import UNetModel
from test_unet import _randomise, tiny_unet_config


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


def test_guidance_with_latents_shared_by_both_conditions_is_the_same_guidance():
    unet = _randomise(UNetModel(tiny_unet_config(context_dim=4))).eval()
    cond, uncond = _conditions()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0])
    with torch.no_grad():
        shared = guided_model(unet, cond, uncond, 7.5, shared_latents=True)(x, t)
        repeated = guided_model(unet, cond, uncond, 7.5)(x, t)
    assert torch.allclose(shared, repeated, atol=1e-5)


def test_guidance_rescale_matches_conditional_std():
    cond, uncond = _conditions()
    x, t = torch.randn(2, 4, 3, 5), torch.tensor([10.0, 20.0])
    out = guided_model(_network, cond, uncond, 7.5, rescale=1.0)(x, t)
    ref = _network(x, t, **network_kwargs(cond))
    assert torch.allclose(out.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)), rtol=1e-4)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        guided_model(_network, cond, uncond, -1.0)


def test_condition_dropout_rate_and_content():
    n = 20000
    cond = Conditioning(torch.ones(n, 3, 2), torch.ones(n, 3, dtype=torch.bool))
    null = Conditioning(torch.full((1, 2, 2), -1.0), torch.ones(1, 2, dtype=torch.bool))
    dropped, drop = drop_condition(cond, null, 0.1, torch.Generator().manual_seed(0))
    assert abs(drop.float().mean().item() - 0.1) < 0.01
    assert (dropped.tokens[drop, :2] == -1).all() and (~dropped.mask[drop, 2]).all()
    assert (dropped.tokens[~drop] == 1).all() and dropped.mask[~drop].all()


def test_objective_targets_and_min_snr():
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    x_t = q_sample(x0, t, noise, abar)
    v = training_target(x0, t, noise, abar, "v_prediction")
    a = abar[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5)  # x0 = √ᾱ x_t − √(1−ᾱ) v
    snr = abar[t] / (1 - abar[t])
    assert torch.allclose(min_snr_weight(t, abar, 5.0, "epsilon"), (snr.clamp(max=5) / snr).float())
    perfect = lambda x, tt: (x - a.sqrt() * x0) / (1 - a).sqrt()  # noqa: E731 — the exact ε for these x0
    assert diffusion_loss(perfect, x0, t, noise, abar).item() < 1e-9


def test_ema_update_and_warmup():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 1 - 0.9 ** 2))
    assert EMA(model, decay=0.9999).current_decay() == pytest.approx(0.1)
