"""Drawing from an image rather than from noise alone: img2img and inpainting.

- img2img (SDEdit, Meng et al. 2022): the image's latents are noised to the level of a step part-way down the grid
  and the sampler runs from there; `strength` s runs the last ⌊n·s⌋ of n steps (diffusers' `get_timesteps`).
- inpainting with any model: after every step the region to keep is replaced by the image's latents noised to
  the level the sampler has reached (latent blending; diffusers' `StableDiffusionInpaintPipeline` for a 4-channel
  UNet); models trained for inpainting (SD-inpainting's 9 channels) are given the mask and the masked image by
  concatenation instead (`conditioning/spatial.py`).
- the kept pixels are pasted back over the decoded image (AUTOMATIC1111's default overlay), unless asked not to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latent_diffusion.generation.request import check_number
from latent_diffusion.samplers.grid import Grid, grid_from, noised


def start_step(steps: int, strength: float, name: str = "strength") -> int:
    """The first of `steps` steps that img2img runs at `strength` ∈ (0, 1]: steps − min(⌊steps·s⌋, steps), as
    diffusers' `get_timesteps` (so the same strength runs the same steps); at least one step must run."""
    check_number(strength, 0.0, 1.0, name, " (0: the image unchanged, 1: drawn anew from noise)")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"{name} = {strength} with {steps} steps runs no step (⌊steps·strength⌋ = 0): raise "
                         f"{name} or the steps")
    return steps - run


@dataclass(frozen=True)
class Start:
    """Where sampling starts from an image: the image's scaled latents, the noise drawn for it, the mask at the latent
    grid (1 = generate; None: the whole image, img2img) and the first step of the full grid."""

    latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor | None
    step: int

    def begin(self, grid: Grid, from_noise: bool) -> tuple[Grid, torch.Tensor]:
        """(the part of `grid` that runs, the sampler's x at its start): the image's latents noised to the level of
        the start step, or the whole grid from pure noise (inpainting at strength 1, as diffusers does)."""
        if from_noise:
            return grid, self.noise
        grid = grid_from(grid, self.step)
        return grid, noised(grid, 0, self.latents, self.noise)

    def blending(self, grid: Grid) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """A sampler callback that keeps the unmasked region on the image's own noisy path (latent blending), for
        models without an inpainting condition; None for img2img."""
        if self.mask is None:
            return None
        mask = self.mask

        def blend(i: int, x: torch.Tensor, _denoised: torch.Tensor) -> torch.Tensor:
            keep = noised(grid, i + 1, self.latents, self.noise)  # the level step i + 1 starts at (clean at the end)
            return (1 - mask) * keep.to(x.dtype) + mask * x
        return blend


def overlay(images: torch.Tensor, originals: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The original pixels pasted back where the mask (B, 1, H, W) in [0, 1] keeps them: m·image + (1 − m)·original
    (AUTOMATIC1111's and diffusers' `apply_overlay`, a soft mask blending the seam)."""
    return masks * images + (1 - masks) * originals
