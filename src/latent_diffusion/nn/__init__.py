"""Shared network blocks of the denoising UNet: embeddings and (cross-)attention."""
