"""Cheap previews of latents while sampling: a linear map from latent channels to RGB per latent pixel, fitted once
per model to its own autoencoder (least squares between the latents of random pictures, flat shapes on flat
backgrounds and smooth colour fields, and those pictures averaged over each latent pixel). It costs one small
matrix product per preview instead of a decoder pass (AUTOMATIC1111's "Approximate cheap" preview, with the factors
fitted rather than written by hand for one model).

Not every autoencoder is that linear: the fit's share of the colour variance it explains (`r2`) says how well the
map holds, and `LatentDiffusion.preview` decodes for real where it holds poorly (small first stages, where a
decode is cheap anyway)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from latent_diffusion.conditioning.spatial import encode_latents
from latent_diffusion.images import tensor_to_pil
from latent_diffusion.runtime import autocast

GOOD_FIT = 0.9  # the r2 from which the map stands in for the decoder


def fitting_pictures(count: int, side: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """(count, channels, side, side) in [-1, 1]: half smooth random colour fields, half flat-coloured rectangles
    and ellipses on flat backgrounds."""
    fields = count // 2
    coarse = torch.rand(fields, channels, 4, 4, generator=generator) * 2 - 1
    smooth = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    shapes = count - fields
    pictures = (torch.rand(shapes, channels, 1, 1, generator=generator) * 2 - 1).repeat(1, 1, side, side)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for _ in range(3):
        centre = torch.rand(shapes, 2, 1, 1, generator=generator) * side
        radius = torch.rand(shapes, 2, 1, 1, generator=generator) * side / 3 + side / 10
        dy, dx = (y - centre[:, 0]) / radius[:, 0], (x - centre[:, 1]) / radius[:, 1]
        ellipse = torch.rand(shapes, 1, 1, generator=generator) < 0.5
        inside = torch.where(ellipse, dy**2 + dx**2 <= 1, (dy.abs() <= 1) & (dx.abs() <= 1))
        colour = torch.rand(shapes, channels, 1, 1, generator=generator) * 2 - 1
        pictures = torch.where(inside[:, None], colour, pictures)
    return torch.cat([smooth, pictures])


class LatentPreview:
    """`preview(latents)`: the images a batch of scaled latents roughly decodes to, without the decoder;
    `r2`: the share of the colour variance the map explains on the pictures it was fitted to."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, factor: int, r2: float):
        self.weight, self.bias = weight, bias  # (colours, C), (colours,)
        self.factor, self.r2 = factor, r2  # pixels per latent pixel, fit quality

    @classmethod
    @torch.no_grad()
    def fit(cls, autoencoder: torch.nn.Module, channels: int, device: torch.device,
            math: str, count: int = 48, side: int = 64) -> LatentPreview:
        """Fitted to `count` pictures of `channels` colours and `side`² pixels (seeded: the same model always gets
        the same map); `math` is the precision the autoencoder runs at."""
        pictures = fitting_pictures(count, side, channels, torch.Generator().manual_seed(0))
        with autocast(device, math):
            latents = encode_latents(autoencoder, pictures.to(device)).float().cpu()
        factor = side // latents.shape[-1]
        colours = F.avg_pool2d(pictures, factor) if factor > 1 else pictures
        z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        rgb = colours.permute(0, 2, 3, 1).reshape(-1, channels).double()
        design = torch.cat([z, torch.ones(len(z), 1)], dim=1).double()
        solution = torch.linalg.lstsq(design, rgb).solution  # (C + 1, channels)
        r2 = 1 - ((design @ solution - rgb) ** 2).sum().item() / ((rgb - rgb.mean(0)) ** 2).sum().item()
        solution = solution.float()
        return cls(solution[:-1].T.contiguous(), solution[-1].contiguous(), factor, r2)

    def __call__(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """One preview per latent (N, C, h, w), at `size` (H, W) or the latents' times the autoencoder's factor."""
        rgb = torch.einsum("nchw,kc->nkhw", latents.detach().float().cpu(), self.weight)
        rgb = rgb + self.bias[None, :, None, None]
        size = size or (latents.shape[-2] * self.factor, latents.shape[-1] * self.factor)
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
        return [tensor_to_pil(x) for x in rgb.clamp(-1, 1)]
