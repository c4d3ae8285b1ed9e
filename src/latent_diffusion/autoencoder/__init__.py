"""The first stage: a KL-regularised or vector-quantised autoencoder and its training objective (or pixel space,
f = 1)."""

from latent_diffusion.autoencoder.distributions import DiagonalGaussianDistribution
from latent_diffusion.autoencoder.model import AutoencoderKL, Decoder, Encoder, VQAutoencoder
from latent_diffusion.autoencoder.quantize import VectorQuantizer
from latent_diffusion.autoencoder.pixel import PixelSpace, build_autoencoder, pixel_space_config

__all__ = ["AutoencoderKL", "Decoder", "DiagonalGaussianDistribution", "Encoder", "PixelSpace", "build_autoencoder",
           "pixel_space_config", "VectorQuantizer", "VQAutoencoder"]
