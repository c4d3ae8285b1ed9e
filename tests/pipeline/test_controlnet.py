"""ControlNets on a Pipeline: the images diffusers' StableDiffusionControlNetPipeline draws with the same ControlNet
folders, control images, scales and step ranges (one, two at once, guess mode); a ControlNet for another model and
a control image of the wrong size are clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.config import SamplingConfig
from latent_diffusion.controlnet import ControlNet, ControlNetConfig
from latent_diffusion.formats.controlnet import save_controlnet
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.generation.control import Control
from latent_diffusion.pipeline import Pipeline

from conftest import TINY_SD1, randomised, tiny_original_parts
from formats.test_controlnet import tiny_diffusers_controlnet
from formats.test_lora import diffusers_pipe

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red cube on a table"
DDIM = SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      prompts=("a cat",), steps=4, guidance_scale=7.5)
OPTIONS = dict(steps=4, guidance_scale=7.5, sampler="ddim", seed=7, height=32, width=32, progress=False)


def control_image(seed: int) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((32, 32), Image.NEAREST)


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(parts, diffusers folder, two ControlNet folders for its f=2 autoencoder: hints 2× the latents)."""
    parts = dataclasses.replace(tiny_original_parts(TINY_SD1, resolution=32), sampling=DDIM)
    folder = tmp_path_factory.mktemp("sd1-control")
    write_diffusers(parts, folder)
    nets = [folder / f"controlnet-{i}" for i in range(2)]
    for i, net in enumerate(nets):
        tiny_diffusers_controlnet(net, seed=i, conditioning_embedding_out_channels=(16, 32))
    return parts, folder, nets


def theirs_draw(folder, nets, images, noise, **options):
    sd = diffusers_pipe(folder)
    controlnets = [diffusers.ControlNetModel.from_pretrained(n).eval() for n in nets]
    pipe = diffusers.StableDiffusionControlNetPipeline(**{k: v for k, v in sd.components.items()},
                                                       controlnet=controlnets if len(nets) > 1 else controlnets[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=images if len(nets) > 1 else images[0], height=32, width=32, num_inference_steps=4,
                guidance_scale=7.5, latents=noise, output_type="pt", **options).images


@pytest.mark.parametrize("case", ["one", "guess mode", "two with step ranges"])
def test_images_are_those_diffusers_draws_with_the_same_controlnets(model, case):
    parts, folder, nets = model
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    images = [control_image(1), control_image(2)]
    ours = Pipeline.from_parts(parts, device="cpu")
    loaded = [ours.load_controlnet(n) for n in nets]
    if case == "two with step ranges":
        settings = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.3],
                        control_guidance_end=[0.6, 1.0])
        controls = [Control(loaded[0], pixels(images[0]), 0.8, 0.0, 0.6),
                    Control(loaded[1], pixels(images[1]), 0.5, 0.3, 1.0)]
        expected = theirs_draw(folder, nets, images, noise, **settings)
    else:
        guess = case == "guess mode"
        expected = theirs_draw(folder, nets[:1], images, noise, controlnet_conditioning_scale=0.8, guess_mode=guess)
        controls = [Control(loaded[0], pixels(images[0]), 0.8)]
    got = (ours.generate_tensors(PROMPT, controls=controls, guess_mode=case == "guess mode", **OPTIONS) + 1) / 2
    plain = (ours.generate_tensors(PROMPT, **OPTIONS) + 1) / 2
    assert (got - plain).abs().max() > 0.01, "the control hardly changes the image: the test would prove nothing"
    assert (got - expected).abs().max() <= 1e-4


def test_a_controlnet_for_another_model_and_a_control_image_of_the_wrong_size_are_clear_errors(model, tmp_path):
    parts, _, nets = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    for_sd = randomised(ControlNet(ControlNetConfig.of_unet(TINY_SD1[0], downsample_factor=8)), 0)
    save_controlnet(for_sd, tmp_path / "f8.safetensors")
    with pytest.raises(ValueError, match=r"is for another model: control images 8× the latents \(this model's "
                                         r"autoencoder: 2×\)"):
        pipe.load_controlnet(tmp_path / "f8.safetensors")
    net = pipe.load_controlnet(nets[0])
    with pytest.raises(ValueError, match=r"controls\[0\].image is 24×24: expected the output's 32×32"):
        pipe.generate_tensors(PROMPT, controls=[Control(net, torch.rand(1, 3, 24, 24))], **OPTIONS)
    with pytest.raises(ValueError, match=r"controls\[0\].start = 0.7 and controls\[0\].end = 0.2: expected start"):
        pipe.generate_tensors(PROMPT, controls=[Control(net, torch.rand(1, 3, 32, 32), 1.0, 0.7, 0.2)], **OPTIONS)
