"""The training objective: q(x_t | x_0), the ε / v targets and the min-SNR weight."""

import torch

from latent_diffusion.diffusion.objective import diffusion_loss, min_snr_weight, q_sample, training_target


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
