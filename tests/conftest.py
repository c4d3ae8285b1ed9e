"""Shared fixtures: tiny configs and tiny datasets that run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from latent_diffusion.config import (AutoencoderConfig, AutoencoderLossConfig, AutoencoderRunConfig,
                                     ConditioningConfig, DataConfig, LDMRunConfig, SamplingConfig, TrainConfig,
                                     UNetConfig)
from latent_diffusion.data.shapes import write_shapes_folder
from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run
from latent_diffusion.training.autoencoder import train_autoencoder


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default init plus noise on every parameter (zero-initialised output layers and unit norms would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module.eval()


def tiny_autoencoder_config(ch_mult=(1, 2), resolution=16, **kw) -> AutoencoderConfig:
    """A few-thousand-parameter autoencoder (widths 8/16, GroupNorm 4)."""
    base = dict(ch=8, ch_mult=tuple(ch_mult), num_res_blocks=1, z_channels=4, embed_dim=4,
                resolution=resolution, norm_groups=4)
    base.update(kw)
    return AutoencoderConfig(**base)


def tiny_run_config(max_steps: int = 4, **training) -> AutoencoderRunConfig:
    train = dict(batch_size=4, learning_rate=1e-3, max_steps=max_steps, log_every=1, image_every=2,
                 checkpoint_every=2, seed=0)
    train.update(training)
    return AutoencoderRunConfig(model=tiny_autoencoder_config(resolution=32),
                                loss=AutoencoderLossConfig(disc_start=2, disc_channels=8, disc_num_layers=2),
                                data=DataConfig(resolution=32), training=TrainConfig(**train))


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """24 captioned shape images."""
    return write_shapes_folder(tmp_path_factory.mktemp("shapes"), 24, seed=3, progress=False)


@pytest.fixture(scope="session")
def autoencoder_run(tmp_path_factory, shapes_folder):
    """A tiny trained autoencoder run with its latent scale (the first stage of the tiny LDMs)."""
    run = tmp_path_factory.mktemp("ae")
    train_autoencoder(tiny_run_config(max_steps=2), shapes_folder, run, device="cpu", progress=False)
    evaluate_autoencoder_run(run, shapes_folder, run / "eval", device="cpu", write_scale=True, progress=False)
    return run


def tiny_ldm_config(autoencoder_run, max_steps=40, **training) -> LDMRunConfig:
    """A tiny text-conditional LDM (MiniLM tokens, UNet widths 16/32) on 32×32 shapes."""
    train = dict(batch_size=8, learning_rate=2e-3, max_steps=max_steps, log_every=5, image_every=1000,
                 checkpoint_every=20, ema_decay=0.9, lr_warmup_steps=0)
    train.update(training)
    return LDMRunConfig(
        autoencoder=str(autoencoder_run),
        unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_heads=2, context_dim=384, norm_groups=8),
        conditioning=ConditioningConfig(encoder="minilm", max_length=32),
        data=DataConfig(resolution=32), training=TrainConfig(**train),
        sampling=SamplingConfig(prompts=("a small red circle in the center",), steps=3, sampler="ddim"))
