"""The diagonal Gaussian posterior q(z|x) produced by the encoder."""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments stacked on the channel axis.

    :param moments: (B, 2C, h, w) tensor: the first C channels are the mean, the last C the log-variance.
    """

    LOGVAR_RANGE = (-30.0, 20.0)

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, *self.LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def point(cls, mean: torch.Tensor) -> DiagonalGaussianDistribution:
        """A point mass at `mean` (the smallest variance): what deterministic first stages (pixel space, VQ)
        give where a KL autoencoder gives its posterior."""
        return cls(torch.cat([mean, torch.full_like(mean, cls.LOGVAR_RANGE[0])], dim=1))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε with ε ~ N(0, I) (the reparameterisation trick)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The posterior mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per sample, summed over latent elements: ½ Σ (μ² + σ² − 1 − log σ²)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
