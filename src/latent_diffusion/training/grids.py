"""What training runs show of themselves: grids of reconstructions (first stage) and of samples (diffusion)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.spatial import spatial_kind
from latent_diffusion.generation.model import LatentDiffusion
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.runtime import autocast
from latent_diffusion.training.latent_cache import LatentCache


@torch.no_grad()
def write_reconstruction_grid(model: AutoencoderKL, images: torch.Tensor, path: Path, dev: torch.device,
                              precision: str = "fp32", size: int = 256) -> Image.Image:
    """Originals (top row) above their reconstructions (bottom row), enlarged to about `size` pixels high each;
    written to `path` and returned."""
    model.eval()
    with autocast(dev, precision):
        recon = model(images, sample_posterior=False)[0]
    scale = max(1, size // images.shape[-1])
    grid = make_grid([images, recon.float()], scale=scale, captions=["originals", "reconstructions"])
    save_image(grid, path)
    return grid


def sample_inputs(kind: str, cache: LatentCache, count: int = 4) -> dict[str, torch.Tensor]:
    """Fixed inputs for a spatial model's sample grids: the first training images (and a centre mask)."""
    spatial = spatial_kind(kind)
    return {} if spatial is None else spatial.sample_inputs(cache.pixels(torch.arange(min(count, len(cache)))))


@torch.no_grad()
def write_sample_grid(out: Path, step: int, pipe: LatentDiffusion, inputs: dict | None = None,
                      shown: tuple[str, torch.Tensor] | None = None) -> Image.Image:
    """One row per sampling prompt (written under it), at the configured sampler and guidance; `inputs` (a spatial
    model's images and masks, or ControlNets) condition every row and are shown as the first row (`shown`: its
    caption and images in [-1, 1], else the spatial condition's). Written and returned."""
    s, inputs = pipe.config.sampling, inputs or {}
    if inputs and shown is None:
        spatial = spatial_kind(pipe.config.conditioning.spatial)
        shown = (f"input ({spatial.shown_as})", spatial.shown(inputs, pipe.latent_size(None, None)))
    count = shown[1].shape[0] if shown else 4
    rows = [pipe.generate_tensors(prompt, num_images=count, steps=s.steps, guidance_scale=s.guidance_scale,
                                  sampler=s.sampler, seed=s.seed, progress=False, **inputs) for prompt in s.prompts]
    captions = list(s.prompts)
    if shown:
        rows.insert(0, torch.nn.functional.interpolate(shown[1].float().cpu(), size=rows[0].shape[-2:],
                                                       mode="nearest"))
        captions.insert(0, shown[0])
    grid = make_grid(rows, scale=max(1, 128 // rows[0].shape[-1]), captions=captions)
    save_image(grid, out / "samples" / f"samples_{step:07d}.png")
    return grid
