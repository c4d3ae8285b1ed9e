"""Spatial conditions concatenated to z_t (the paper's concatenation conditioning, §3.3).

- "low_res": the image at the latent grid's size (super-resolution by the autoencoder's factor f);
  `image_channels` extra channels.
- "inpaint": Stable Diffusion inpainting's layout: [mask (1 = region to generate), latents of the masked image]
  → 1 + latent channels extra channels, in that order after z_t (so SD inpainting checkpoints run unchanged).

A spatial condition is kept in both the conditional and the unconditional branch of guidance (as SD does): only
the text or class condition is dropped.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.config import ConfigError

SpatialKind = Literal["none", "low_res", "inpaint"]
SPATIAL_KINDS: tuple[str, ...] = ("none", "low_res", "inpaint")


def spatial_channels(kind: SpatialKind, image_channels: int, latent_channels: int) -> int:
    """Channels a spatial condition adds to the UNet's input."""
    return {"none": 0, "low_res": image_channels, "inpaint": 1 + latent_channels}[kind]


def check_spatial(kind: SpatialKind, concat_channels: int, image_channels: int, latent_channels: int) -> None:
    """The UNet's concat_channels must be what the spatial condition provides."""
    expected = spatial_channels(kind, image_channels, latent_channels)
    if concat_channels != expected:
        raise ConfigError(f"unet.concat_channels = {concat_channels}: conditioning.spatial = '{kind}' provides "
                          f"{expected} channels (image channels {image_channels}, latent channels {latent_channels})")


def infer_spatial(concat_channels: int, image_channels: int, latent_channels: int) -> SpatialKind:
    """The spatial condition a UNet with `concat_channels` extra input channels was trained with."""
    for kind in SPATIAL_KINDS:
        if spatial_channels(kind, image_channels, latent_channels) == concat_channels:
            return kind
    raise ConfigError(f"a UNet with {concat_channels} concatenated input channels: no known spatial condition "
                      f"(inpaint: {1 + latent_channels}, low_res: {image_channels})")


def low_res_condition(images: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] resized (area average) to the latent grid: (B, C, h, w)."""
    return F.interpolate(images, size=latent_size, mode="area")


def random_masks(batch_size: int, height: int, width: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Training masks (B, 1, H, W), 1 = region to generate: a random rectangle covering 10–100 % of each side,
    the whole image for 1 in 8 (plain text-to-image), no mask for 1 in 8 (reconstruction)."""
    masks = torch.zeros(batch_size, 1, height, width)
    u = torch.rand(batch_size, 5, generator=generator)
    for i in range(batch_size):
        if u[i, 0] < 0.125:
            masks[i] = 1.0
        elif u[i, 0] < 0.25:
            continue
        h = max(1, int(height * (0.1 + 0.9 * u[i, 1])))
        w = max(1, int(width * (0.1 + 0.9 * u[i, 2])))
        top, left = int((height - h) * u[i, 3]), int((width - w) * u[i, 4])
        masks[i, :, top:top + h, left:left + w] = 1.0
    return masks


@torch.no_grad()
def inpaint_condition(autoencoder: AutoencoderKL, images: torch.Tensor, masks: torch.Tensor,
                      latent_scale: float) -> torch.Tensor:
    """[mask at the latent grid, scaled latents of the image with the masked region set to 0] (B, 1 + c, h, w)."""
    if masks.shape[-2:] != images.shape[-2:] or masks.shape[1] != 1:
        raise ValueError(f"mask of shape {tuple(masks.shape)}: expected (B, 1, {images.shape[-2]}, "
                         f"{images.shape[-1]}), the image's size")
    masks = (masks >= 0.5).to(images.dtype)
    latents = autoencoder.encode(images * (1 - masks)).mode() * latent_scale
    return torch.cat([F.interpolate(masks, size=latents.shape[-2:], mode="nearest"), latents], dim=1)


def spatial_condition(kind: SpatialKind, images: torch.Tensor, latent_size: tuple[int, int],
                      autoencoder: AutoencoderKL | None = None, latent_scale: float = 1.0,
                      masks: torch.Tensor | None = None) -> torch.Tensor:
    """The `kind` condition of `images` (B, C, H, W) in [-1, 1]; "inpaint" needs the autoencoder and masks."""
    if kind == "low_res":
        return low_res_condition(images, latent_size)
    if kind == "inpaint":
        if autoencoder is None or masks is None:
            raise ValueError("an inpainting condition needs the autoencoder and a mask")
        return inpaint_condition(autoencoder, images, masks, latent_scale)
    raise ValueError(f"unknown spatial condition {kind!r}; expected one of {', '.join(SPATIAL_KINDS[1:])}")


def with_spatial(network, spatial: torch.Tensor | None):
    """`network(x, t, **kw)` with `spatial` concatenated to x; repeated when guidance doubles the batch."""
    if spatial is None:
        return network

    def concatenated(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        repeats = x.shape[0] // spatial.shape[0]
        return network(torch.cat([x, spatial.to(x.dtype).repeat(repeats, 1, 1, 1)], dim=1), t, **kwargs)
    return concatenated
