"""`ldm train` trains SD3's MMDiT (`backbone: mmdit`): on any text encoder's tokens with either objective, and as
SD3 does, on the three frozen SD3 text encoders with rectified flow; the run folders generate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_ldm_config
from latent_diffusion.config import ConfigError, DiffusionConfig, MMDiTConfig, SamplingConfig
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm
from sd3_fixtures import tiny_sd3_diffusers

pytest.importorskip("diffusers")

TINY = MMDiTConfig(in_channels=4, out_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                   context_dim=384, adm_in_channels=None, pos_embed_max_size=16)
FLOW = dict(diffusion=DiffusionConfig(objective="flow", flow_shift=3.0),
            sampling=SamplingConfig(prompts=("a small red circle in the center",), steps=3, sampler="flow_euler"))


@pytest.mark.parametrize("objective", ["flow", "diffusion"])
def test_an_mmdit_trains_on_minilm_tokens_and_generates(tmp_path, autoencoder_run, shapes_folder, objective):
    cfg = dataclasses.replace(tiny_ldm_config(autoencoder_run, max_steps=4, checkpoint_every=2), backbone="mmdit",
                              mmdit=TINY, **(FLOW if objective == "flow" else {}))
    last = train_ldm(cfg, shapes_folder, tmp_path / "run", device="cpu", progress=False)
    assert last["step"] == 4 and torch.isfinite(torch.tensor(last["loss"]))
    pipe = Pipeline.from_pretrained(tmp_path / "run", device="cpu")
    assert type(pipe.unet).__name__ == "MMDiT"
    images = pipe.generate_tensors("a red circle", steps=3, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all() and images.std() > 0.01
    with pytest.raises(ConfigError, match="holds MMDiTs as SD3 models only"):
        save_model(load_model(tmp_path / "run"), tmp_path / "x", "diffusers")


def test_an_sd3_model_trains_on_its_three_text_encoders(tmp_path, autoencoder_run, shapes_folder):
    """SD3's conditioning from a model folder (text_encoder.safetensors with its tokenizer/ beside it): CLIP-L,
    CLIP-G and T5 tokens, the pooled vector; the 16-channel VAE swapped for the shapes autoencoder."""
    sd3 = load_model(tiny_sd3_diffusers(tmp_path / "diffusers", seed=0))
    save_model(sd3, tmp_path / "sd3", "native")
    mmdit = dataclasses.replace(sd3.unet_config, in_channels=4, out_channels=4, pos_embed_max_size=16)
    conditioning = dataclasses.replace(sd3.conditioning, path=str(tmp_path / "sd3" / "text_encoder.safetensors"),
                                       t5_max_length=8)
    cfg = dataclasses.replace(tiny_ldm_config(autoencoder_run, max_steps=4, checkpoint_every=2), backbone="mmdit",
                              mmdit=mmdit, conditioning=conditioning, **FLOW)
    last = train_ldm(cfg, shapes_folder, tmp_path / "run", device="cpu", progress=False)
    assert last["step"] == 4 and torch.isfinite(torch.tensor(last["loss"]))
    pipe = Pipeline.from_pretrained(tmp_path / "run", device="cpu")
    assert pipe.config.conditioning.encoder == "sd3" and pipe.conditioner.encoder.t5_config is not None
    images = pipe.generate_tensors("a red circle", steps=3, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    wrong = dataclasses.replace(cfg, mmdit=dataclasses.replace(mmdit, adm_in_channels=64))
    with pytest.raises(ConfigError, match="mmdit.adm_in_channels = 64: the sd3 encoder gives a vector condition of 80"):
        train_ldm(wrong, shapes_folder, tmp_path / "run2", device="cpu", progress=False)
