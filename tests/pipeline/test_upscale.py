"""SD's x4 upscaler (diffusers' StableDiffusionUpscalePipeline): a tiny random one saved by diffusers loads as a
low_res model with noise augmentation, and draws the images diffusers draws from the same low-resolution image,
noise level, prompt and seed; the noise level of a request; clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.config import SamplingConfig
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.pipeline import Pipeline

from conftest import TINY_SD1, tiny_original_parts

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT = "a red cube on a table"
DDIM = SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      prompts=("a cat",), steps=3, guidance_scale=7.5)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """A diffusers StableDiffusionUpscalePipeline folder: TINY_SD1's text encoder, a 7-channel UNet with 1000 noise
    level embeddings, an f=4 VAE (scaling factor 0.08333, as released), the DDPM augmentation schedule."""
    base = tmp_path_factory.mktemp("base")
    write_diffusers(dataclasses.replace(tiny_original_parts(TINY_SD1, resolution=32), sampling=DDIM), base)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), num_class_embeds=1000, sample_size=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                                  scaling_factor=0.08333)
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, unet=unet, text_encoder=transformers.CLIPTextModel.from_pretrained(base / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(base / "tokenizer"),
        low_res_scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=diffusers.DDIMScheduler.from_pretrained(base / "scheduler"), max_noise_level=350)
    folder = tmp_path_factory.mktemp("x4-upscaler")
    pipe.save_pretrained(folder)
    return folder


def small_image(seed: int = 1) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((8, 8), Image.BICUBIC)


@pytest.mark.parametrize("noise_level", [20, 150])
def test_images_are_those_the_upscale_pipeline_draws(upscaler, noise_level):
    theirs = diffusers.StableDiffusionUpscalePipeline.from_pretrained(upscaler)
    theirs.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(s) for s in (5, 6)]
    expected = theirs([PROMPT] * 2, image=[small_image(1), small_image(2)], num_inference_steps=3,
                      guidance_scale=7.5, noise_level=noise_level, generator=generator, output_type="pt").images
    ours = Pipeline.from_pretrained(upscaler, device="cpu")
    assert ours.config.conditioning.spatial == "low_res" and ours.config.conditioning.noise_level == 20
    images = torch.cat([torch.from_numpy(np.array(small_image(s), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
                        for s in (1, 2)])
    got = (ours.generate_tensors(PROMPT, image=images, num_images=2, steps=3, guidance_scale=7.5, sampler="ddim",
                                 seed=5, height=32, width=32, progress=False,
                                 noise_level=None if noise_level == 20 else noise_level) + 1) / 2
    assert got.shape == (2, 3, 32, 32)
    assert (got - expected).abs().max() <= 1e-4


def test_noise_level_requests_are_checked(upscaler, tmp_path):
    ours = Pipeline.from_pretrained(upscaler, device="cpu")
    with pytest.raises(ValueError, match="noise_level = 400: expected an integer from 0 to 350"):
        ours.generate_tensors(PROMPT, image=small_image(), steps=2, height=32, width=32, noise_level=400,
                              progress=False)
    plain = Pipeline.from_parts(tiny_original_parts(TINY_SD1, resolution=32), device="cpu")
    with pytest.raises(ValueError, match="noise_level = 10: this model's low-resolution input is not noise-augmented"):
        plain.generate_tensors(PROMPT, steps=2, noise_level=10, progress=False)
