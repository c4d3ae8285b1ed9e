"""The denoising network of an LDM config: the paper's UNet (`unet.py`) or a diffusion transformer (`dit.py`); both
take the same call, `(x, t, context, context_mask, class_labels, ...) → ε (or v)`."""

from __future__ import annotations

from torch import nn

from latent_diffusion.config import DiTConfig, UNetConfig
from latent_diffusion.dit import DiT
from latent_diffusion.unet import UNetModel


def build_backbone(cfg: UNetConfig | DiTConfig) -> nn.Module:
    """The network `cfg` describes (`LDMRunConfig.network`)."""
    return DiT(cfg) if isinstance(cfg, DiTConfig) else UNetModel(cfg)
