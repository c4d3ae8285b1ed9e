"""A diffusion transformer backbone (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): the
latents as a sequence of patches, transformer blocks conditioned on the timestep by adaLN-Zero, and (PixArt-α,
Chen et al. 2023) cross-attention to the condition tokens.

Module names follow the DiT reference code (`x_embedder.proj`, `t_embedder.mlp`, `blocks.N.attn.qkv`,
`blocks.N.adaLN_modulation`, `final_layer`); the call is the UNet's, so either backbone serves any LDM config
(`backbone: dit`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latent_diffusion.config import DiTConfig, MMDiTConfig
from latent_diffusion.nn.attention import CrossAttention
from latent_diffusion.nn.conditions import check_conditions
from latent_diffusion.nn.embeddings import grid_position_embedding, timestep_embedding

FREQUENCY_DIM = 256  # the sinusoidal timestep features the timestep MLP reads (DiT's frequency_embedding_size)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, per sample (shift, scale: (B, D); x: (B, N, D))."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (DiT's `Attention`: `qkv`, `proj`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """x + gate·attn(adaLN(x)), [x + cross_attn(LN(x), tokens)], x + gate·mlp(adaLN(x)); shift, scale and gate of
    both come from the conditioning embedding, the gates starting at zero (adaLN-Zero: each block starts as the
    identity)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(h, cfg.num_heads)
        if cfg.context_dim is not None:
            self.norm_cross = nn.LayerNorm(h, eps=1e-6)
            self.cross_attn = CrossAttention(h, cfg.context_dim, cfg.num_heads, h // cfg.num_heads)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(h, int(h * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, D) tokens, c (B, D) conditioning embedding, context (B, L, Dc) with mask (B, L)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context.to(x.dtype), mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class PatchEmbed(nn.Module):
    """(B, C, H, W) → (B, H/p · W/p, D) by a p×p convolution of stride p (`proj`)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t → MLP(sinusoidal features of t) (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_DIM).to(dtype))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; zero-initialised) → Linear to p²·C_out per token (zero-initialised); the DiT's and the
    MMDiT's."""

    def __init__(self, cfg: DiTConfig | MMDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(h, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """ε_θ(x_t, t, context) (or the flow velocity) by a transformer over latent patches; see `DiTConfig`."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        if cfg.num_classes is not None:
            self.y_embedder = nn.Embedding(cfg.num_classes, cfg.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(cfg.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for block in self.blocks:  # DiT's initialisation of the transformer's linear layers
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None, class_labels: torch.Tensor | None) -> None:
        """Raise a clear error for inputs this network cannot take."""
        cfg, b, p = self.config, x.shape[0], self.config.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, h, w) with h and w multiples of the patch "
                             f"size {p} (dit.in_channels counts concatenated conditions), got {tuple(x.shape)}")
        check_conditions(cfg, b, t, context, context_mask, class_labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                residuals=None, extra_context: Mapping[str, torch.Tensor] | None = None,
                vector: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, h, w), t (B,) (may be fractional), context (B, L, D), mask (B, L) → (B, C_out, h, w)."""
        if residuals is not None or extra_context or vector is not None:
            raise ValueError("a DiT backbone takes no control residuals, extra attention streams or vector condition")
        self.check_inputs(x, t, context, context_mask, class_labels)
        cfg, p = self.config, self.config.patch_size
        b, _, h, w = x.shape
        tokens = self.x_embedder(x)  # (B, N, D), N = (h/p)(w/p)
        positions = grid_position_embedding(h // p, w // p, cfg.hidden_size, x.device, tokens.dtype)  # (N, D)
        tokens = tokens + positions[None]
        c = self.t_embedder(t, tokens.dtype)  # (B, D)
        if class_labels is not None:
            c = c + self.y_embedder(class_labels).to(c.dtype)
        for block in self.blocks:
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)
        out = self.final_layer(tokens, c)  # (B, N, p·p·C_out)
        out = out.reshape(b, h // p, w // p, p, p, cfg.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, cfg.out_channels, h, w)  # (B, C_out, h, w)
