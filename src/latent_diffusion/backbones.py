"""The denoising network of an LDM config: the paper's UNet (`unet.py`), a diffusion transformer (`dit.py`) or SD3's
MMDiT (`mmdit.py`); all take the same call, `(x, t, context, context_mask, class_labels, ...) → ε (or v)`."""

from __future__ import annotations

from torch import nn

from latent_diffusion.config import DiTConfig, MMDiTConfig, UNetConfig
from latent_diffusion.dit import DiT
from latent_diffusion.mmdit import MMDiT
from latent_diffusion.unet import UNetModel


def build_backbone(cfg: UNetConfig | DiTConfig | MMDiTConfig) -> nn.Module:
    """The network `cfg` describes (`LDMRunConfig.network`)."""
    if isinstance(cfg, MMDiTConfig):
        return MMDiT(cfg)
    return DiT(cfg) if isinstance(cfg, DiTConfig) else UNetModel(cfg)
