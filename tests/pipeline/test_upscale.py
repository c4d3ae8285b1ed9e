"""SD's x4 upscaler (diffusers' StableDiffusionUpscalePipeline): a tiny random one saved by diffusers loads as a
low_res model with noise augmentation, and draws the images diffusers draws from the same low-resolution image,
noise level, prompt and seed; the noise level of a request; clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from latent_diffusion.config import DiffusionConfig, SamplingConfig
from latent_diffusion.diffusion.schedule import build_schedule
from latent_diffusion.formats.diffusers_config import (scheduler_config_from_diffusers, scheduler_config_to_diffusers,
                                                       unet_config_from_diffusers, unet_config_to_diffusers)
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.formats.keymaps import unet_state_to_diffusers
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.formats.original_format import from_original_state_dict, load_original_state_dict
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.unet import UNetModel

from conftest import TINY_SD1, tiny_original_parts

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT = "a red cube on a table"
DDIM = SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      prompts=("a cat",), steps=3, guidance_scale=7.5)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """A diffusers StableDiffusionUpscalePipeline folder shaped as the released one, made tiny: a 7-channel UNet with
    1000 noise-level embeddings, no attention at the first level and cross-attention only (only_cross_attention)
    below the deepest, linear projections; an f=4 VAE (scaling factor 0.08333); a v-prediction DDIM scheduler over
    scaled_linear betas from 1e-4 to 0.02; the DDPM augmentation schedule; TINY_SD1's text encoder."""
    base = tmp_path_factory.mktemp("base")
    write_diffusers(dataclasses.replace(tiny_original_parts(TINY_SD1, resolution=32), sampling=DDIM), base)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), num_class_embeds=1000,
        only_cross_attention=[True, True, False], use_linear_projection=True, sample_size=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                                  scaling_factor=0.08333)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1)
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, unet=unet, text_encoder=transformers.CLIPTextModel.from_pretrained(base / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(base / "tokenizer"),
        low_res_scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=scheduler, max_noise_level=350)
    folder = tmp_path_factory.mktemp("x4-upscaler")
    pipe.save_pretrained(folder)
    return folder


def small_image(seed: int = 1) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((8, 8), Image.BICUBIC)


@pytest.fixture(scope="module")
def single_file(upscaler, tmp_path_factory):
    """The same model as an original single file, with its CompVis YAML (x4-upscaling.yaml's layout) beside it."""
    path = tmp_path_factory.mktemp("original") / "x4-upscaler.safetensors"
    save_model(load_model(upscaler), path, "original")
    return path


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("noise_level", [20, 150])
def test_images_are_those_the_upscale_pipeline_draws(upscaler, single_file, layout, noise_level):
    theirs = diffusers.StableDiffusionUpscalePipeline.from_pretrained(upscaler)
    theirs.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(s) for s in (5, 6)]
    expected = theirs([PROMPT] * 2, image=[small_image(1), small_image(2)], num_inference_steps=3,
                      guidance_scale=7.5, noise_level=noise_level, generator=generator, output_type="pt").images
    ours = Pipeline.from_pretrained(upscaler if layout == "diffusers" else single_file, device="cpu")
    assert ours.config.conditioning.spatial == "low_res" and ours.config.conditioning.noise_level == 20
    assert ours.config.unet.disable_self_attentions == (True, True, False)
    assert ours.config.diffusion.beta_range == (0.0001, 0.02) and ours.config.diffusion.prediction_type == "v_prediction"
    images = torch.cat([torch.from_numpy(np.array(small_image(s), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
                        for s in (1, 2)])
    got = (ours.generate_tensors(PROMPT, image=images, num_images=2, steps=3, guidance_scale=7.5, sampler="ddim",
                                 seed=5, height=32, width=32, progress=False,
                                 noise_level=None if noise_level == 20 else noise_level) + 1) / 2
    assert got.shape == (2, 3, 32, 32)
    assert (got - expected).abs().max() <= 1e-4


def test_the_single_file_holds_the_same_model_in_the_upscalers_compvis_layout(upscaler, single_file):
    params = yaml.safe_load(single_file.with_suffix(".yaml").read_text())["model"]
    assert params["target"].endswith("LatentUpscaleDiffusion") and params["params"]["conditioning_key"] == "hybrid-adm"
    assert params["params"]["low_scale_config"]["params"]["max_noise_level"] == 350
    assert params["params"]["unet_config"]["params"]["disable_self_attentions"] == [True, True, False]
    a, b = load_model(upscaler), load_model(single_file)
    for name in ("unet_config", "autoencoder_config", "conditioning", "diffusion"):
        assert getattr(a, name) == getattr(b, name), name
    assert all(torch.equal(a.unet[k], b.unet[k]) for k in a.unet) and a.unet.keys() == b.unet.keys()
    unspecified = {**params["params"], "unet_config": {"params": {**params["params"]["unet_config"]["params"],
                                                                  "disable_self_attentions": None}}}
    inferred = from_original_state_dict(load_original_state_dict(single_file), unspecified).unet_config
    # without the YAML's flags they come from attn1's shapes; level 0 has no transformer, so its flag is moot
    assert inferred == dataclasses.replace(a.unet_config, disable_self_attentions=(False, True, False))


def test_noise_level_requests_are_checked(upscaler, tmp_path):
    ours = Pipeline.from_pretrained(upscaler, device="cpu")
    with pytest.raises(ValueError, match="noise_level = 400: expected an integer from 0 to 350"):
        ours.generate_tensors(PROMPT, image=small_image(), steps=2, height=32, width=32, noise_level=400,
                              progress=False)
    plain = Pipeline.from_parts(tiny_original_parts(TINY_SD1, resolution=32), device="cpu")
    with pytest.raises(ValueError, match="noise_level = 10: this model's low-resolution input is not noise-augmented"):
        plain.generate_tensors(PROMPT, steps=2, noise_level=10, progress=False)


# The released stabilityai/stable-diffusion-x4-upscaler, as diffusers describes it (its x4-upscaling.yaml converted:
# model_channels 256, channel_mult [1, 2, 2, 4], attention at levels 1-3, disable_self_attentions [T, T, T, F],
# num_heads 8, num_classes 1000, linear_start/end 1e-4/0.02 with v-prediction, scale_factor 0.08333)
X4_UNET = {"_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "block_out_channels": [256, 512, 512, 1024],
           "cross_attention_dim": 1024, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
           "in_channels": 7, "layers_per_block": 2, "num_class_embeds": 1000,
           "only_cross_attention": [True, True, True, False], "out_channels": 4, "sample_size": 128,
           "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], "use_linear_projection": True}
X4_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
                "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1}


def test_the_released_upscalers_unet_and_scheduler_are_read_and_written_back():
    """Every key and shape of the full-size UNet (built on the meta device) has its counterpart in ours; the configs
    written back read the same."""
    cfg, size = unet_config_from_diffusers(X4_UNET)
    assert (cfg.disable_self_attentions, cfg.num_heads, cfg.num_classes, cfg.concat_channels, size) == \
        ((True, True, True, False), 8, 1000, 3, 128)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(X4_UNET).state_dict()
        ours = UNetModel(cfg).state_dict()
    converted = unet_state_to_diffusers(cfg, ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg, size)) == (cfg, size)
    fields, sampling = scheduler_config_from_diffusers(X4_SCHEDULER)
    diffusion = DiffusionConfig(**fields)
    assert diffusion.beta_range == (0.0001, 0.02) and diffusion.prediction_type == "v_prediction"
    written = scheduler_config_to_diffusers(diffusion, SamplingConfig(**{**sampling, "sampler": "ddim"}))
    assert DiffusionConfig(**scheduler_config_from_diffusers(written)[0]) == diffusion
    betas = diffusers.DDIMScheduler.from_config(X4_SCHEDULER).alphas_cumprod.double()
    assert torch.allclose(build_schedule(diffusion).alphas_cumprod, betas, rtol=1e-6)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_a_controlnet_on_the_upscaler_reads_its_noise_level(upscaler, tmp_path, guess_mode):
    """A ControlNet copied from a UNet with class embeddings gets the images' noise level as the UNet does."""
    from latent_diffusion.controlnet import ControlNet
    from latent_diffusion.formats.controlnet import save_controlnet
    from latent_diffusion.generation.control import Control

    ours = Pipeline.from_pretrained(upscaler, device="cpu")
    net = ControlNet.from_unet(ours.unet, downsample_factor=4)
    with torch.no_grad():
        for conv in [*net.zero_convs, net.middle_block_out]:
            conv[0].weight.normal_(0, 0.05)
        net.input_hint_block[-1].weight.normal_(0, 0.05)
    save_controlnet(net, tmp_path / "control.safetensors")
    loaded = ours.load_controlnet(tmp_path / "control.safetensors")
    options = dict(image=small_image(), steps=2, height=32, width=32, seed=3, progress=False, guess_mode=guess_mode)
    plain = ours.generate_tensors(PROMPT, **options)
    controlled = ours.generate_tensors(PROMPT, controls=[Control(loaded, torch.rand(1, 3, 32, 32))], **options)
    assert (controlled - plain).abs().max() > 1e-3
