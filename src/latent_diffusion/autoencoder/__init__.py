"""The first stage: a KL-regularised autoencoder and its training objective."""

from latent_diffusion.autoencoder.distributions import DiagonalGaussianDistribution
from latent_diffusion.autoencoder.model import AutoencoderKL, Decoder, Encoder

__all__ = ["AutoencoderKL", "Decoder", "DiagonalGaussianDistribution", "Encoder"]
