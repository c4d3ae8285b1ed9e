"""PSNR and SSIM against closed forms."""

import math

import torch

from latent_diffusion.evaluation.metrics import psnr, ssim


def test_psnr_of_known_error():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 20.0]), atol=1e-4)


def test_ssim_identical_is_one_and_constants_follow_closed_form():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    a, b = 0.3, 0.7  # constant images: variances and covariance vanish
    c1 = 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 1, 16, 16), 2 * a - 1), torch.full((1, 1, 16, 16), 2 * b - 1))
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_ssim_falls_as_noise_grows():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x)
    scores = [ssim(x, x + s * noise).item() for s in (0.05, 0.2, 0.8)]
    assert scores[0] > scores[1] > scores[2]
