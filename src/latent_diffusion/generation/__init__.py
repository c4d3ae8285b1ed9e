"""Text to image over a model in memory (`LatentDiffusion`), and the limits of a generation request."""

from latent_diffusion.generation.model import LatentDiffusion, Settings

__all__ = ["LatentDiffusion", "Settings"]
