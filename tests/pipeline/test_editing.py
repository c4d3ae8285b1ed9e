"""img2img and inpainting: the images diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline
draw with the same weights, strength and seed (a plain model by latent blending, an SD-inpainting model by its
9-channel condition); the overlay; the strength's steps; clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.config import SamplingConfig
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.generation.editing import start_step
from latent_diffusion.pipeline import Pipeline

from conftest import TINY_SD1, tiny_original_parts

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red cube on a table"
DDIM = SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      prompts=("a cat",), steps=4, guidance_scale=7.5)
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def photo(seed: int = 0, size: int = 32) -> Image.Image:
    """A smooth random RGB picture."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def square_mask(size: int = 32) -> Image.Image:
    """White (draw anew) in a centred square of half the side, black elsewhere."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return Image.fromarray(mask)


def model(tmp_path_factory, name: str, **unet_changes):
    parts = dataclasses.replace(tiny_original_parts(TINY_SD1, resolution=32, **unet_changes), sampling=DDIM)
    if unet_changes:
        parts = dataclasses.replace(parts, conditioning=dataclasses.replace(parts.conditioning, spatial="inpaint"))
    folder = tmp_path_factory.mktemp(name)
    write_diffusers(parts, folder)
    return Pipeline.from_parts(parts, device="cpu"), folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return model(tmp_path_factory, "sd1")


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    return model(tmp_path_factory, "sd1-inpaint", in_channels=9, concat_channels=5)


def theirs(kind: str, folder, sampler: str):
    pipe = getattr(diffusers, kind).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def drawn(pipe, seeds: list[int], **images) -> torch.Tensor:
    """diffusers' images in [0, 1], one generator per image, each input image given once per output image (with
    one image for several outputs, its inpainting pipeline encodes it with the first generator alone)."""
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    images = {key: [value] * len(seeds) if isinstance(value, Image.Image) else value for key, value in images.items()}
    return pipe([PROMPT] * len(seeds), num_inference_steps=4, guidance_scale=7.5, generator=generator,
                output_type="pt", **images).images


def ours(pipe: Pipeline, sampler: str, **options) -> torch.Tensor:
    return (pipe.generate_tensors(PROMPT, steps=4, guidance_scale=7.5, sampler=sampler, seed=3, progress=False,
                                  **options) + 1) / 2


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_draws_what_diffusers_draws(plain, sampler, strength):
    pipe, folder = plain
    expected = drawn(theirs("StableDiffusionImg2ImgPipeline", folder, sampler), [3, 4], image=photo(),
                     strength=strength)
    got = ours(pipe, sampler, image=photo(), strength=strength, num_images=2)
    assert (got - ours(pipe, sampler, num_images=2)).abs().max() > 0.05, "the image changes nothing: a vacuous test"
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_a_plain_model_by_latent_blending_draws_what_diffusers_draws(plain, sampler, strength):
    pipe, folder = plain
    expected = drawn(theirs("StableDiffusionInpaintPipeline", folder, sampler), [3], image=photo(),
                     mask_image=square_mask(), strength=strength)
    got = ours(pipe, sampler, image=photo(), mask=square_mask(), strength=strength, overlay=False)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_an_inpainting_model_draws_what_diffusers_draws(inpainting, strength):
    pipe, folder = inpainting
    expected = drawn(theirs("StableDiffusionInpaintPipeline", folder, "ddim"), [3, 4], image=photo(),
                     mask_image=square_mask(), strength=strength)
    got = ours(pipe, "ddim", image=photo(), mask=square_mask(), strength=strength, overlay=False, num_images=2)
    assert (got - expected).abs().max() <= 1e-4


def test_the_overlay_pastes_back_the_kept_pixels_and_only_those(plain):
    pipe = plain[0]
    original = (torch.from_numpy(np.array(photo(), dtype=np.float32)).permute(2, 0, 1) / 255)[None]
    kept = torch.from_numpy(np.array(square_mask())) == 0
    pasted = ours(pipe, "ddim", image=photo(), mask=square_mask())
    decoded = ours(pipe, "ddim", image=photo(), mask=square_mask(), overlay=False)
    assert torch.allclose(pasted[..., kept], original[..., kept], atol=1e-6)
    assert torch.equal(pasted[..., ~kept], decoded[..., ~kept])
    assert (decoded[..., kept] - original[..., kept]).abs().max() > 0.01  # the decoder alone does not keep them


def test_the_output_takes_the_size_of_the_image_rounded_down_to_what_the_model_needs(plain):
    pipe = plain[0]
    out = pipe.generate_tensors(PROMPT, steps=2, image=photo(size=45), strength=0.5, progress=False)
    assert out.shape[-2:] == (44, 44)  # multiples of 4: the f=2 autoencoder × the UNet's 2
    assert pipe.generate_tensors(PROMPT, steps=2, image=photo(), height=16, width=24, progress=False,
                                 strength=0.5).shape[-2:] == (16, 24)


def test_strength_runs_the_last_share_of_the_steps_as_diffusers_counts_them():
    assert [start_step(10, s) for s in (1.0, 0.75, 0.5, 0.15)] == [0, 3, 5, 9]
    with pytest.raises(ValueError, match=r"strength = 0.05 with 10 steps runs no step"):
        start_step(10, 0.05)
    with pytest.raises(ValueError, match=r"strength = 1.5: expected a finite number from 0 to 1"):
        start_step(10, 1.5)


def test_bad_image_requests_are_clear_errors(plain, inpainting):
    with pytest.raises(ValueError, match=r"mask= without image=: a mask marks the region"):
        plain[0].generate_tensors(PROMPT, mask=square_mask(), progress=False)
    with pytest.raises(ValueError, match=r"this model is conditioned on an image \(image=\) and a mask"):
        inpainting[0].generate_tensors(PROMPT, image=photo(), progress=False)
    with pytest.raises(ValueError, match=r"strength = 0.01 with 4 steps runs no step"):
        plain[0].generate_tensors(PROMPT, steps=4, image=photo(), strength=0.01, progress=False)
