"""The diagonal Gaussian posterior: its KL against torch.distributions, its samples' moments, the clamped
log-variance."""

import torch

from latent_diffusion.autoencoder import DiagonalGaussianDistribution


def test_kl_matches_closed_form_against_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 5)
    q = DiagonalGaussianDistribution(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), ref, rtol=1e-5, atol=1e-5)


def test_posterior_sample_has_the_posterior_moments():
    mean = torch.full((1, 2, 64, 64), 0.5)
    logvar = torch.full((1, 2, 64, 64), 2 * torch.log(torch.tensor(0.25)).item())
    q = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.25) < 0.01
    assert torch.equal(q.mode(), mean)


def test_logvar_is_clamped():
    q = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -100.0)], 1))
    assert q.logvar.min().item() == -30.0
