"""Pixel space as a first stage (f = 1): the paper's pixel-based diffusion baseline ("LDM-1").

`PixelSpace` stands where the autoencoder stands and does nothing: the "latent" is the image in [-1, 1], so the same
training loop, samplers and pipeline run a pixel-space diffusion model. A model trained on it has an `autoencoder/`
folder like any other, holding a config with `pixel_space: true` and an empty weights file.
"""

from __future__ import annotations

import torch
from torch import nn

from latent_diffusion.autoencoder.distributions import DiagonalGaussianDistribution
from latent_diffusion.config import AutoencoderConfig


def pixel_space_config(channels: int, resolution: int) -> AutoencoderConfig:
    """The first-stage config of pixel-space diffusion on `channels`-channel images of size `resolution`."""
    return AutoencoderConfig(in_channels=channels, out_channels=channels, z_channels=channels, embed_dim=channels,
                             ch_mult=(1,), num_res_blocks=1, resolution=resolution, latent_scale=1.0,
                             pixel_space=True)


class PixelSpace(nn.Module):
    """The identity first stage: `encode(x)` is a point mass at x, `decode(z)` is z."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if not cfg.pixel_space:
            raise ValueError("PixelSpace needs a config with pixel_space = true")
        self.config = cfg
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device); no state

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution.point(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior) as `AutoencoderKL.forward` returns them: (x, the point mass at x)."""
        return x, self.encode(x)


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """The first stage a config describes: `PixelSpace` for `pixel_space: true`, a `VQAutoencoder` for
    `regularizer: vq`, else an `AutoencoderKL`."""
    from latent_diffusion.autoencoder.model import AutoencoderKL, VQAutoencoder
    if cfg.pixel_space:
        return PixelSpace(cfg)
    return VQAutoencoder(cfg) if cfg.regularizer == "vq" else AutoencoderKL(cfg)
