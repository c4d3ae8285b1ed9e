"""Pixel-space diffusion (`autoencoder: pixel`, f = 1): the identity first stage through training, loading and
generation, as the latent-vs-pixel experiment uses it."""

import json
from dataclasses import replace

import pytest
import torch

from latent_diffusion.autoencoder import PixelSpace, pixel_space_config
from latent_diffusion.config import AutoencoderConfig, ConfigError, LDMRunConfig, load_config
from latent_diffusion.files.weights import load_weights
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.autoencoder import train_autoencoder
from latent_diffusion.training.ldm import train_ldm

from conftest import tiny_ldm_config, tiny_run_config


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, shapes_folder):
    cfg = tiny_ldm_config("pixel", max_steps=20, log_every=5, checkpoint_every=10)
    cfg = replace(cfg, unet=replace(cfg.unet, in_channels=3, out_channels=3))
    run = tmp_path_factory.mktemp("pixel")
    train_ldm(cfg, shapes_folder, run, device="cpu", progress=False)
    return run


def test_pixel_space_is_the_identity():
    stage = PixelSpace(pixel_space_config(3, 32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = stage.encode(x)
    assert torch.equal(posterior.mode(), x) and torch.equal(stage.decode(x), x)
    assert posterior.std.max() < 1e-6 and stage.config.downsample_factor == 1 and not stage.state_dict()


def test_pixel_run_trains_and_its_folder_is_a_model(pixel_run, shapes_folder):
    losses = [json.loads(line)["loss"] for line in (pixel_run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < losses[0]  # steps 1, 5, 10, 15, 20
    ae = load_config(pixel_run / "autoencoder" / "config.yaml")
    assert ae.model.pixel_space and ae.model.latent_scale == 1.0 and ae.model.embed_dim == 3
    assert load_weights(pixel_run / "autoencoder" / "autoencoder.safetensors") == {}
    cache = load_weights(pixel_run / "cache" / "latents.safetensors")
    assert cache["mean"].shape == (24, 3, 32, 32)  # the images themselves, at full resolution
    assert cache["mean"].min() >= -1 and cache["mean"].max() <= 1 and cache["std"].max() < 1e-6
    assert load_config(pixel_run / "config.yaml", LDMRunConfig).autoencoder == "pixel"

    pipe = Pipeline.from_pretrained(pixel_run, device="cpu")
    assert isinstance(pipe.autoencoder, PixelSpace)
    images = pipe.generate_tensors("a small red circle in the center", num_images=2, steps=3, sampler="ddim",
                                   seed=0, progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="height"):  # f = 1: only the UNet's downsampling (2) constrains sizes
        pipe.generate_tensors("a small red circle", height=21, width=32, steps=2, progress=False)
    assert pipe.generate_tensors("a small red circle", height=34, width=32, steps=2,
                                 progress=False).shape[-2:] == (34, 32)


def test_pixel_models_stay_native(pixel_run, tmp_path):
    parts = load_model(pixel_run)
    save_model(parts, tmp_path / "copy", "native")
    again = Pipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert isinstance(again.autoencoder, PixelSpace)
    for fmt in ("original", "diffusers"):
        with pytest.raises(ConfigError, match="pixel-space model"):
            save_model(parts, tmp_path / f"out.{fmt}", fmt)


def test_pixel_space_misuse_is_a_clear_error(tmp_path, shapes_folder):
    with pytest.raises(ConfigError, match="pixel_space"):
        AutoencoderConfig(in_channels=3, out_channels=3, embed_dim=4, ch_mult=(1,), pixel_space=True)
    cfg = tiny_run_config()
    with pytest.raises(ConfigError, match="nothing to train"):
        train_autoencoder(replace(cfg, model=pixel_space_config(3, 32)), shapes_folder, tmp_path, device="cpu",
                          progress=False)
    wrong = tiny_ldm_config("pixel", max_steps=1)  # in_channels 4 for 3-channel images: the dataset says so
    with pytest.raises((ConfigError, ValueError), match="channel"):
        train_ldm(wrong, shapes_folder, tmp_path / "wrong", device="cpu", progress=False)
