"""Previews of latents while sampling: the linear map fitted to a first stage (exact for pixel space, with its fit
quality), and a model's preview of an encoded picture showing that picture (by the map where it fits, else by the
decoder); the same model always gets the same map."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from latent_diffusion.autoencoder.pixel import PixelSpace, pixel_space_config
from latent_diffusion.conditioning.spatial import encode_latents
from latent_diffusion.generation.preview import GOOD_FIT, LatentPreview
from latent_diffusion.images import pil_to_tensor, tensor_to_pil


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (245, 245, 240))
    ImageDraw.Draw(image).ellipse((6, 8, 40, 42), fill=(220, 30, 30))
    ImageDraw.Draw(image).rectangle((36, 36, 60, 60), fill=(30, 160, 40))
    return image


def test_the_map_fitted_to_pixel_space_is_the_identity():
    preview = LatentPreview.fit(PixelSpace(pixel_space_config(3, 32)), 3, torch.device("cpu"), "fp32")
    assert preview.r2 > 0.9999 and preview.factor == 1
    assert torch.allclose(preview.weight, torch.eye(3), atol=1e-4) and preview.bias.abs().max() < 1e-4
    x = pil_to_tensor(picture())[None]
    assert np.abs(np.asarray(preview(x)[0], dtype=int) - np.asarray(tensor_to_pil(x[0]), dtype=int)).max() <= 1


def test_a_models_preview_shows_the_picture_its_latents_hold(bundled_pipe):
    truth = np.asarray(picture())
    with torch.no_grad():
        latents = encode_latents(bundled_pipe.autoencoder, pil_to_tensor(picture())[None])
    shown = bundled_pipe.preview(latents)[0]
    assert shown.size == (64, 64) and shown.mode == "RGB"
    mean = np.broadcast_to(truth.reshape(-1, 3).mean(0), truth.shape)
    assert psnr(np.asarray(shown), truth) > psnr(mean, truth) + 6
    fitted = bundled_pipe._preview
    assert fitted.r2 < GOOD_FIT  # this small autoencoder is far from linear: the decoder draws its previews
    with torch.no_grad():
        decoded = tensor_to_pil(bundled_pipe.decode(latents / bundled_pipe.latent_scale)[0])
    assert np.array_equal(np.asarray(shown), np.asarray(decoded))
    again = LatentPreview.fit(bundled_pipe.autoencoder, 3, bundled_pipe.device, "fp32")
    assert torch.allclose(again.weight, fitted.weight, atol=1e-6) and again.factor == 4  # up to summation order
    assert abs(again.r2 - fitted.r2) < 1e-9
