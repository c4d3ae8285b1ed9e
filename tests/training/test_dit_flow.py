"""Either backbone with either objective: `ldm train` trains a DiT (`backbone: dit`) and a rectified-flow model
(`diffusion.objective: flow`), the run folders generate, and what does not fit is refused clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_ldm_config
from latent_diffusion.config import ConfigError, DiffusionConfig, DiTConfig, SamplingConfig
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

TINY_DIT = DiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=384)
FLOW = dict(diffusion=DiffusionConfig(objective="flow", flow_shift=2.0),
            sampling=SamplingConfig(prompts=("a small red circle in the center",), steps=3, sampler="flow_euler"))


@pytest.mark.parametrize("backbone,objective", [("dit", "flow"), ("dit", "diffusion"), ("unet", "flow")])
def test_each_backbone_trains_with_each_objective_and_generates(tmp_path, autoencoder_run, shapes_folder, backbone,
                                                                objective):
    cfg = tiny_ldm_config(autoencoder_run, max_steps=4, checkpoint_every=2)
    if backbone == "dit":
        cfg = dataclasses.replace(cfg, backbone="dit", dit=TINY_DIT)
    if objective == "flow":
        cfg = dataclasses.replace(cfg, **FLOW)
    run = tmp_path / "run"
    last = train_ldm(cfg, shapes_folder, run, device="cpu", progress=False)
    assert last["step"] == 4 and torch.isfinite(torch.tensor(last["loss"]))
    pipe = Pipeline.from_pretrained(run, device="cpu")
    assert type(pipe.unet).__name__ == ("DiT" if backbone == "dit" else "UNetModel")
    images = pipe.generate_tensors("a red circle", steps=3, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    if objective == "flow":
        heun = pipe.generate_tensors("a red circle", steps=3, seed=0, sampler="flow_heun", progress=False)
        assert not torch.equal(heun, images)
        with pytest.raises(ValueError, match="dpmpp_2m samples diffusion models; this model is a flow model"):
            pipe.generate_tensors("a red circle", steps=3, sampler="dpmpp_2m", progress=False)
    with pytest.raises(ConfigError, match="the original format holds UNets and SD3's MMDiT only|"
                                          "the original format describes"):
        save_model(load_model(run), tmp_path / "x.safetensors", "original")


def test_a_flow_model_edits_images_on_its_straight_path(tmp_path, autoencoder_run, shapes_folder):
    cfg = dataclasses.replace(tiny_ldm_config(autoencoder_run, max_steps=2, checkpoint_every=2), **FLOW)
    train_ldm(cfg, shapes_folder, tmp_path / "run", device="cpu", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run", device="cpu")
    image = pipe.generate_tensors("a red circle", steps=4, seed=0, progress=False)
    edited = pipe.generate_tensors("a red circle", steps=4, seed=1, image=image, strength=0.25, progress=False)
    assert (edited - image).abs().mean() < (pipe.generate_tensors("a red circle", steps=4, seed=1, progress=False)
                                            - image).abs().mean()  # a quarter of the path keeps the picture


def test_configs_that_mix_objectives_and_samplers_are_refused():
    with pytest.raises(ConfigError, match="a flow sampler .* for diffusion.objective 'flow'"):
        dataclasses.replace(tiny_ldm_config("ae"), diffusion=DiffusionConfig(objective="flow"))
    with pytest.raises(ConfigError, match="no prediction_type"):
        DiffusionConfig(objective="flow", prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="a dit section exactly when backbone is 'dit'"):
        dataclasses.replace(tiny_ldm_config("ae"), backbone="dit")
    with pytest.raises(ConfigError, match="dit.hidden_size"):
        DiTConfig(hidden_size=30, num_heads=4)
