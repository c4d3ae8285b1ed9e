"""Latent Diffusion Models: perceptual compression (KL autoencoder) + diffusion in latent space."""

__version__ = "0.1.0"
