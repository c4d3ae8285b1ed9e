"""The first-stage objective: adaptive GAN weight, discriminator losses, LPIPS plumbing, overfitting."""

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.autoencoder.losses import (LPIPS, AutoencoderLoss, NLayerDiscriminator, adaptive_weight,
                                                 hinge_d_loss, vanilla_d_loss)
from latent_diffusion.config import AutoencoderLossConfig

from conftest import tiny_autoencoder_config


def test_adaptive_weight_against_hand_computation():
    """Last layer y = W x: ∇_W Σ|y − t| = sign(y − t) xᵀ and ∇_W (−mean y) = −(1/n) 1 xᵀ."""
    torch.manual_seed(0)
    x = torch.randn(5)
    target = torch.randn(3)
    weight = torch.randn(3, 5, requires_grad=True)
    y = weight @ x
    rec = (y - target).abs().sum()
    g = -y.mean()
    got = adaptive_weight(rec, g, weight, delta=1e-4)
    xn, yn, tn = x.numpy(), y.detach().numpy(), target.numpy()
    rec_grad = np.outer(np.sign(yn - tn), xn)
    g_grad = np.outer(-np.ones(3) / 3, xn)
    expected = np.linalg.norm(rec_grad) / (np.linalg.norm(g_grad) + 1e-4)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_discriminator_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())


def test_patchgan_outputs_a_grid_of_logits():
    logits = NLayerDiscriminator(3, 8, 3)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)


def test_lpips_with_random_weights_is_a_distance_and_loads_published_layouts(tmp_path):
    torch.manual_seed(0)
    model = LPIPS()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for lin in model.lins:
            lin.weight.abs_()  # published heads are non-negative
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-6)
    assert (model(x, y) > 0).all()
    # torchvision's vgg16 state dict (features.* plus classifier.*) and lpips' vgg.pth (lin{k}.model.1.weight)
    vgg = {f"features.{k}": v for k, v in model.net.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16.pth")
    save_file({f"lin{k}.model.1.weight": lin.weight.contiguous() for k, lin in enumerate(model.lins)},
              str(tmp_path / "lpips_vgg.safetensors"))
    loaded = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.safetensors")
    assert torch.allclose(loaded(x, y), model(x, y))


def test_perceptual_disabled_is_logged_once(caplog):
    with caplog.at_level(logging.INFO):
        AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=0.0), 3)
    assert sum("perceptual loss disabled" in r.message for r in caplog.records) == 1


def test_generator_loss_adds_weighted_adversarial_term_after_disc_start():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_autoencoder_config())
    loss = AutoencoderLoss(AutoencoderLossConfig(disc_start=10, disc_channels=8, disc_num_layers=2), 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_rec, post = model(x)
    before = loss.generator_loss(x, x_rec, post, step=9, last_layer=model.decoder.last_layer)
    after = loss.generator_loss(x, x_rec, post, step=10, last_layer=model.decoder.last_layer)
    assert before.d_weight.item() == 0 and after.d_weight.item() > 0
    assert after.total.item() == pytest.approx((before.total + after.d_weight * after.g_loss).item(), rel=1e-5)


def test_tiny_autoencoder_overfits_one_batch():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_autoencoder_config(resolution=8))
    loss = AutoencoderLoss(AutoencoderLossConfig(disc_weight=0.0), 3)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        x_rec, post = model(x)
        terms = loss.generator_loss(x, x_rec, post, step, model.decoder.last_layer)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
        losses.append(terms.l1.item())
    assert min(losses[-10:]) < losses[0] / 10
