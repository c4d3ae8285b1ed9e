"""Conversions between tensors in [-1, 1] and images, and image grids written atomically."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from latent_diffusion.io.atomic import atomic_write_bytes


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 PIL image → float tensor (C, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (C, H, W) in [-1, 1] → uint8 PIL image (L or RGB)."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def make_grid(rows: list[torch.Tensor], pad: int = 2, scale: int = 1) -> Image.Image:
    """One image from rows of batches (each (N, C, H, W) in [-1, 1]); `scale` enlarges small images."""
    n = max(r.shape[0] for r in rows)
    _, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = img.detach().float().cpu().clamp(-1, 1)
    image = tensor_to_pil(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
