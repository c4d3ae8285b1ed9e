"""What every denoising network checks of its conditions before it runs: clear errors, not shape errors deep in
torch."""

from __future__ import annotations

import torch

from latent_diffusion.config import DiTConfig, UNetConfig


def check_conditions(cfg: UNetConfig | DiTConfig, b: int, t: torch.Tensor, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None, class_labels: torch.Tensor | None,
                     vector: torch.Tensor | None = None) -> None:
    """A clear error for timesteps, context tokens, mask, class labels or vector condition that do not fit a batch
    of `b` for a network of `cfg` (the UNet, a ControlNet copying its encoder, or a DiT)."""
    if tuple(t.shape) != (b,):
        raise ValueError(f"expected timesteps of shape ({b},), got {tuple(t.shape)}")
    if cfg.context_dim is not None and (context is None or context.ndim != 3 or context.shape[0] != b
                                        or context.shape[-1] != cfg.context_dim):
        got = None if context is None else tuple(context.shape)
        raise ValueError(f"expected context tokens of shape ({b}, L, {cfg.context_dim}), got {got}")
    if context_mask is not None and (context is None or tuple(context_mask.shape) != tuple(context.shape[:2])):
        want = "no mask without context" if context is None else f"shape {tuple(context.shape[:2])} (B, L)"
        raise ValueError(f"expected context_mask of {want}, got {tuple(context_mask.shape)}")
    if (cfg.num_classes is not None) != (class_labels is not None):
        raise ValueError("class_labels are required exactly when the network's num_classes is set "
                         f"(num_classes={cfg.num_classes})")
    if class_labels is not None and tuple(class_labels.shape) != (b,):
        raise ValueError(f"expected class_labels of shape ({b},), got {tuple(class_labels.shape)}")
    if cfg.adm_in_channels is None and vector is not None:
        raise ValueError("a vector condition was given to a network without one (unet.adm_in_channels is None)")
    if cfg.adm_in_channels is not None and (vector is None or tuple(vector.shape) != (b, cfg.adm_in_channels)):
        got = None if vector is None else tuple(vector.shape)
        raise ValueError(f"expected a vector condition of shape ({b}, {cfg.adm_in_channels}) (unet.adm_in_channels: "
                         f"SDXL's pooled text and size embeddings), got {got}")
