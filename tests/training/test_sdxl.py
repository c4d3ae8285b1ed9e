"""`ldm train` trains an SDXL-conditioned UNet: two frozen text encoders, the vector condition of each image's own
size, original size and crop (recorded by the latent cache), ∅ as zero text; the run folder generates."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from conftest import tiny_ldm_config, tiny_sdxl_parts
from latent_diffusion.conditioning.sdxl import FOURIER_DIM
from latent_diffusion.config import ConfigError
from latent_diffusion.data.imagefolder import ImageFolder
from latent_diffusion.files.weights import save_weights
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm


def _sdxl_config(autoencoder_run, text_path, **unet):
    parts = tiny_sdxl_parts()
    base = tiny_ldm_config(autoencoder_run, max_steps=6, checkpoint_every=3)
    unet_cfg = dataclasses.replace(parts.unet_config, norm_groups=8, **unet)
    return dataclasses.replace(base, unet=unet_cfg,
                               conditioning=dataclasses.replace(parts.conditioning, path=str(text_path)))


def test_sdxl_trains_on_each_images_geometry_and_generates(tmp_path, autoencoder_run, shapes_folder):
    save_weights(tiny_sdxl_parts().text_encoder, tmp_path / "text_encoder.safetensors")
    cfg = _sdxl_config(autoencoder_run, tmp_path / "text_encoder.safetensors")
    run = tmp_path / "run"
    last = train_ldm(cfg, shapes_folder, run, device="cpu", progress=False)
    assert last["step"] == 6 and torch.isfinite(torch.tensor(last["loss"]))
    pipe = Pipeline.from_pretrained(run, device="cpu")
    assert pipe.config.conditioning.encoder == "sdxl"
    images = pipe.generate_tensors("a red circle", steps=3, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and images.std() > 0.01


def test_image_folders_record_original_size_and_crop(tmp_path):
    Image.new("RGB", (96, 48), "red").save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a red field")
    item = ImageFolder(tmp_path, resolution=32)[0]
    assert item["original_size"].tolist() == [48, 96] and item["crop"].tolist() == [0, 16]  # centred in 64×32


def test_a_vector_width_that_does_not_fit_the_encoders_is_refused(tmp_path, autoencoder_run, shapes_folder):
    save_weights(tiny_sdxl_parts().text_encoder, tmp_path / "text_encoder.safetensors")
    cfg = _sdxl_config(autoencoder_run, tmp_path / "text_encoder.safetensors", adm_in_channels=16 + 5 * FOURIER_DIM)
    with pytest.raises(ConfigError, match="unet.adm_in_channels = 1296: the sdxl encoder gives a vector condition "
                                          "of 1552"):
        train_ldm(cfg, shapes_folder, tmp_path / "run", device="cpu", progress=False)
