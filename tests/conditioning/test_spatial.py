"""Spatial conditions (concatenated channels): under one protocol each registered kind provides the channels it
declares, is fed what a request gives for it, and draws training masks only when it has them; the masks, the
SD-inpainting channel layout, and tiny spatial LDMs trained and sampled."""

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.cli import main
from latent_diffusion.conditioning.spatial import (SPATIAL_CONDITIONS, check_spatial, infer_spatial, inpaint_condition,
                                                   low_res_condition, random_masks, spatial_kind, with_spatial)
from latent_diffusion.config import ConfigError
from latent_diffusion.images import tensor_to_pil
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

from conftest import randomised, tiny_autoencoder_config, tiny_ldm_config


@pytest.mark.parametrize("name", SPATIAL_CONDITIONS)
def test_each_kind_gives_the_channels_it_declares_from_the_inputs_it_asks_for(name):
    spatial = spatial_kind(name)
    autoencoder = randomised(AutoencoderKL(tiny_autoencoder_config(latent_scale=0.5)), seed=0)  # f = 2, 4 channels
    inputs = spatial.sample_inputs(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert tuple(inputs) == spatial.inputs
    condition = spatial.condition(inputs["image"], (8, 8), autoencoder, inputs.get("mask"))
    assert condition.shape == (2, spatial.channels(3, 4), 8, 8)
    assert infer_spatial(spatial.channels(3, 4), 3, 4) == name
    check_spatial(name, spatial.channels(3, 4), 3, 4)
    assert spatial.shown(inputs, (8, 8)).shape[:2] == (2, 3)


def test_only_inpainting_draws_training_masks_as_random_masks_does():
    generator = torch.Generator().manual_seed(3)
    masks = spatial_kind("inpaint").training_masks(6, 16, 24, generator)
    assert torch.equal(masks, random_masks(6, 16, 24, torch.Generator().manual_seed(3)))
    state = generator.get_state()
    assert spatial_kind("low_res").training_masks(6, 16, 24, generator) is None
    assert torch.equal(generator.get_state(), state)  # no draw: a run's random stream is unchanged


def test_no_spatial_condition_and_unknown_kinds():
    assert spatial_kind("none") is None
    with pytest.raises(ValueError, match="unknown spatial condition 'depth'; expected one of low_res, inpaint"):
        spatial_kind("depth")
    with pytest.raises(ValueError, match="an inpainting condition needs the autoencoder and a mask"):
        spatial_kind("inpaint").condition(torch.zeros(1, 3, 16, 16), (8, 8))


def test_random_masks_are_binary_rectangles_with_full_and_empty_cases():
    masks = random_masks(800, 16, 24, torch.Generator().manual_seed(0))
    assert masks.shape == (800, 1, 16, 24) and set(masks.unique().tolist()) <= {0.0, 1.0}
    coverage = masks.mean(dim=(1, 2, 3))
    assert 0.08 < (coverage == 1).float().mean() < 0.2 and 0.08 < (coverage == 0).float().mean() < 0.2
    partial = masks[(coverage > 0) & (coverage < 1)][:, 0]
    rows, cols = partial.amax(dim=2).sum(dim=1), partial.amax(dim=1).sum(dim=1)
    assert torch.equal(partial.sum(dim=(1, 2)), rows * cols)  # each mask is one axis-aligned rectangle


def test_inpaint_condition_is_mask_then_latents_of_the_masked_image():
    torch.manual_seed(0)
    ae = AutoencoderKL(tiny_autoencoder_config(latent_scale=0.5, latent_shift=0.25)).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, :8] = 1.0
    cond = inpaint_condition(ae, images, masks)
    assert cond.shape == (2, 5, 8, 8)
    assert torch.equal(cond[:, :1, :4], torch.ones(2, 1, 4, 8))
    assert torch.equal(cond[:, :1, 4:], torch.zeros(2, 1, 4, 8))
    expected = (ae.encode(images * (1 - masks)).mode() - 0.25) * 0.5
    torch.testing.assert_close(cond[:, 1:], expected)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 8, 8\): expected \(B, 1, 16, 16\)"):
        inpaint_condition(ae, images, masks[:, :, :8, :8])


def test_spatial_condition_follows_a_guidance_doubled_batch():
    seen = {}

    def network(x, t):
        seen["x"] = x
        return x[:, :2]

    spatial = torch.randn(3, 1, 4, 4)
    out = with_spatial(network, spatial)(torch.zeros(6, 2, 4, 4), torch.zeros(6))
    assert out.shape == (6, 2, 4, 4) and seen["x"].shape == (6, 3, 4, 4)
    assert torch.equal(seen["x"][:3, 2:], spatial) and torch.equal(seen["x"][3:, 2:], spatial)
    assert torch.equal(low_res_condition(torch.ones(1, 3, 8, 8), (2, 2)), torch.ones(1, 3, 2, 2))


def test_concat_channels_must_match_the_spatial_condition():
    check_spatial("inpaint", 5, image_channels=3, latent_channels=4)
    with pytest.raises(ConfigError, match="unet.concat_channels = 3: conditioning.spatial = 'inpaint' provides 5"):
        check_spatial("inpaint", 3, image_channels=3, latent_channels=4)
    with pytest.raises(ConfigError, match="concat_channels = 0: conditioning.spatial = 'low_res' provides 3"):
        check_spatial("low_res", 0, image_channels=3, latent_channels=4)


def _spatial_config(autoencoder_run, kind: str, extra: int):
    cfg = tiny_ldm_config(autoencoder_run, max_steps=30)
    unet = replace(cfg.unet, in_channels=4 + extra, concat_channels=extra)
    return replace(cfg, unet=unet, conditioning=replace(cfg.conditioning, spatial=kind))


@pytest.mark.parametrize("kind, extra", [("low_res", 3), ("inpaint", 5)])
def test_tiny_spatial_ldm_trains_and_generates_from_its_image(tmp_path, shapes_folder, autoencoder_run, kind,
                                                             extra):
    run = tmp_path / kind
    train_ldm(_spatial_config(autoencoder_run, kind, extra), shapes_folder, run, device="cpu", progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    assert (run / "samples" / "samples_0000030.png").is_file()
    pipe = Pipeline.from_pretrained(run, device="cpu")
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 1, 32, 32)
    mask[:, :, :16] = 1.0  # the top half is generated, the bottom half kept
    inputs = {"image": image, "mask": mask} if kind == "inpaint" else {"image": image}
    first = pipe.generate_tensors("a small red circle", steps=2, progress=False, **inputs)
    again = pipe.generate_tensors("a small red circle", steps=2, progress=False, **inputs)
    other = pipe.generate_tensors("a small red circle", steps=2, progress=False, **{**inputs, "image": -image})
    assert first.shape == (1, 3, 32, 32) and torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="this model is conditioned on an image"):
        pipe.generate_tensors("a small red circle", steps=2, progress=False)
    files = []
    for name, value in inputs.items():
        tensor_to_pil(value[0] * 2 - 1 if name == "mask" else value[0]).save(tmp_path / f"{name}.png")
        files += [f"--{name}", str(tmp_path / f"{name}.png")]
    assert main(["generate", "a small red circle", "--model", str(run), "--steps", "2", "--device", "cpu",
                 "-o", str(tmp_path / "out.png"), *files]) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_mismatched_concat_channels_are_refused_before_training(tmp_path, shapes_folder, autoencoder_run):
    with pytest.raises(ConfigError, match="conditioning.spatial = 'low_res' provides 3"):
        train_ldm(_spatial_config(autoencoder_run, "low_res", 5), shapes_folder, tmp_path / "run", device="cpu",
                  progress=False)
