"""Distribution distances between feature sets: Fréchet distance (FID, Heusel et al. 2017) and the kernel
distance (KID, Bińkowski et al. 2018, unbiased MMD² with the cubic polynomial kernel)."""

from __future__ import annotations

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features of shape {tuple(features.shape)}: expected (N >= 2, D)")
    f = features.double()
    return f.mean(dim=0), torch.cov(f.T)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½): the Fréchet distance of two Gaussians.

    tr((Σ₁Σ₂)^½) is computed as tr((Σ₁^½ Σ₂ Σ₁^½)^½), a symmetric form with the same eigenvalues."""
    root1 = _sqrt_psd(sigma1)
    cross = _sqrt_psd(root1 @ sigma2 @ root1)
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross.trace())


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussian fits of two feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def kid(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance: unbiased MMD² with k(x, y) = (x·y / D + 1)³, averaged over random subsets; (mean, std)."""
    n = min(subset_size, len(features_a), len(features_b))
    if n < 2:
        raise ValueError("kid needs at least 2 features in each set")
    generator = torch.Generator().manual_seed(seed)
    a_all, b_all = features_a.double(), features_b.double()
    dim = a_all.shape[1]
    values = []
    for _ in range(subsets):
        a = a_all[torch.randperm(len(a_all), generator=generator)[:n]]
        b = b_all[torch.randperm(len(b_all), generator=generator)[:n]]
        k_aa, k_bb, k_ab = ((x @ y.T / dim + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
        off_diagonal = (k_aa.sum() - k_aa.diagonal().sum() + k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
        values.append(float(off_diagonal - 2 * k_ab.mean()))
    tensor = torch.tensor(values)
    return float(tensor.mean()), float(tensor.std()) if subsets > 1 else 0.0
