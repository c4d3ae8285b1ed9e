"""Shared fixtures: tiny configs and tiny datasets that run in seconds on a CPU."""

from __future__ import annotations

import pytest

from latent_diffusion.config import (AutoencoderConfig, AutoencoderLossConfig, AutoencoderRunConfig, DataConfig,
                                     TrainConfig)
from latent_diffusion.data.shapes import write_shapes_folder



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
