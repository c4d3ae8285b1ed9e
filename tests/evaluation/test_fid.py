"""FID and KID against closed forms."""

import pytest
import torch

from latent_diffusion.evaluation.fid import fid, frechet_distance, kid


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # Diagonal covariances: ‖μ₁−μ₂‖² + Σ (√a − √b)².
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    expected = 5.0 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_fid_and_kid_are_near_zero_for_one_distribution_and_grow_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 8, generator=gen), torch.randn(4000, 8, generator=gen)
    assert fid(x, y) < 0.05 and abs(kid(x, y, subsets=20, subset_size=500)[0]) < 0.01
    shifted = y + torch.tensor([1.0] + [0.0] * 7)
    assert fid(x, shifted) == pytest.approx(1.0, abs=0.1)
    assert kid(x, shifted, subsets=20, subset_size=500)[0] > 0.05
