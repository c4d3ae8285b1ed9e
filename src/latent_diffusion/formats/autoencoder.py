"""Loading a trained autoencoder from a run folder (config.yaml + autoencoder.safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from latent_diffusion.autoencoder import AutoencoderKL, build_autoencoder
from latent_diffusion.config import AutoencoderRunConfig, load_config
from latent_diffusion.files.weights import CheckpointError, load_module_weights, load_weights

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "autoencoder.safetensors"


def load_autoencoder(run_dir: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[AutoencoderKL, AutoencoderRunConfig]:
    """The autoencoder of a run folder, in eval mode, with its run config (a `PixelSpace` for pixel space)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir} is not an autoencoder run folder (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE, AutoencoderRunConfig)
    model = build_autoencoder(cfg.model)
    load_module_weights(model, load_weights(run_dir / WEIGHTS_FILE), str(run_dir / WEIGHTS_FILE))
    return model.to(device).eval(), cfg
