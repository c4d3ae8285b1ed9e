"""What both APIs share: base64 images in and out (uploads capped), and a request's values as the keywords of
`Pipeline.generate_tensors`, the loaded model's defaults filled in."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

from PIL import Image, PngImagePlugin

from latent_diffusion.images import decode_image, to_8bit

MAX_UPLOAD = 16 * 2**20  # bytes of one base64 image
MAX_API_SIDE = 2048  # pixels per side a request may ask for


def base64_bytes(data: str, field: str) -> bytes:
    """The bytes of a base64 file (with or without a data: URL prefix), at most MAX_UPLOAD of them."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    if len(payload) * 3 // 4 > MAX_UPLOAD:
        raise ValueError(f"{field}: the image is over {MAX_UPLOAD // 2**20} MiB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not base64") from None


def decode_base64_image(data: str, field: str) -> Image.Image:
    """A base64 image, decoded at 8 bits per channel."""
    return to_8bit(decode_image(base64_bytes(data, field), field))


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """A base64 PNG, carrying `parameters` in its text chunk (A1111's) when given."""
    chunk = PngImagePlugin.PngInfo()
    if parameters is not None:
        chunk.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk)
    return base64.b64encode(buffer.getvalue()).decode()


def pipeline_kwargs(pipe, names: Mapping[str, str], *, prompt: str, negative_prompt: str | None,
                    steps: int | None, guidance: float | None, sampler: str | None, eta: float | None,
                    karras: bool | None, seed: int, num_images: int, height: int | None, width: int | None,
                    image: Image.Image | None = None, mask: Image.Image | None = None,
                    strength: float | None = None) -> dict[str, Any]:
    """The `Pipeline.generate_tensors` keywords of one batch of a request; errors name its fields by `names`."""
    settings = pipe.settings(steps, guidance, sampler, eta, karras, names=names)
    size = pipe.config.data.resolution
    kwargs = dict(prompt=prompt, negative_prompt=negative_prompt, steps=settings.steps,
                  guidance_scale=settings.guidance_scale, sampler=settings.sampler, seed=seed, num_images=num_images,
                  karras=settings.grid.karras or None, eta=eta, height=height or size, width=width or size,
                  progress=False)
    if image is not None:
        height, width = pipe.output_size(image, height, width)  # the image's, rounded as the model needs
        kwargs.update(image=image, height=height, width=width)
    # given without an image, these are the pipeline's clear errors, never dropped
    kwargs.update({key: value for key, value in (("mask", mask), ("strength", strength)) if value is not None})
    return kwargs
