"""SD3's multimodal diffusion transformer, MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", §4):
image patches and condition tokens as two streams with their own weights, joined in one self-attention per block.

Module names follow Stability's reference code (`x_embedder.proj`, `pos_embed`, `t_embedder.mlp`, `y_embedder.mlp`,
`context_embedder`, `joint_blocks.N.{context_block,x_block}.{attn.qkv,attn.proj,attn.ln_q,mlp.fc1,adaLN_modulation}`,
`final_layer`), the layout of SD3 checkpoints under `model.diffusion_model.`, so they load with no renaming. The call
is the UNet's and the DiT's, so an MMDiT serves any LDM config (`backbone: mmdit`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latent_diffusion.config import MMDiTConfig
from latent_diffusion.dit import FinalLayer, Mlp, TimestepEmbedder, modulate
from latent_diffusion.nn.conditions import check_conditions
from latent_diffusion.nn.embeddings import grid_position_embedding


class VectorEmbedder(nn.Module):
    """The vector condition (SD3: the pooled CLIP outputs) → MLP → (B, D) (`mlp.0`, `mlp.2`)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class StreamAttention(nn.Module):
    """One stream's share of an attention: its fused q/k/v projection (`qkv`), the optional per-head RMS norms of
    queries and keys (`ln_q`, `ln_k`), and its output projection (`proj`; none in a `pre_only` stream)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = nn.RMSNorm(dim // heads, eps=1e-6)
            self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) → q, k, v (B, h, N, D/h), queries and keys normed."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of this stream alone (MMDiT-X's second attention over the image tokens)."""
        return self.proj(_attend(self.qkv_heads(x), None))


def _attend(qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over heads, (B, h, N, d) each → (B, N, h·d); `mask` (B, N) True at keys to attend."""
    q, k, v = qkv
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None])
    return out.transpose(1, 2).flatten(2)


class DismantledBlock(nn.Module):
    """One stream's half of a joint block: adaLN-Zero modulation, its attention projections and MLP. The context
    stream of the last block is `pre_only`: it only feeds keys and values to the image stream (adaLN gives shift
    and scale alone). With `self_attention`, the image stream also attends to itself alone (`attn2`)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, self_attention: bool = False):
        super().__init__()
        h = cfg.hidden_size
        self.pre_only, self.self_attention = pre_only, self_attention
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(h, cfg.num_heads, cfg.qk_norm, pre_only)
        if self_attention:
            self.attn2 = StreamAttention(h, cfg.num_heads, cfg.qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(h, int(h * cfg.mlp_ratio))
        chunks = 2 if pre_only else 9 if self_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, chunks * h))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """q, k, v (B, h, N, d) of the modulated tokens, and what `post_attention` needs."""
        mod = self.adaLN_modulation(c).chunk(2 if self.pre_only else 9 if self.self_attention else 6, dim=1)
        qkv = self.attn.qkv_heads(modulate(self.norm1(x), mod[0], mod[1]))
        return qkv, mod

    def post_attention(self, x: torch.Tensor, attended: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x + gate·proj(attention), [+ gate·attn2], + gate·mlp(adaLN(x)): (B, N, D)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = mod
        out = x + gate_msa[:, None] * self.attn.proj(attended)
        if self.self_attention:
            shift2, scale2, gate2 = second
            out = out + gate2[:, None] * self.attn2(modulate(self.norm1(x), shift2, scale2))
        return out + gate_mlp[:, None] * self.mlp(modulate(self.norm2(out), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """A context stream and an image stream attending together (`context_block`, `x_block`)."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, self_attention=index in cfg.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, L, D), x (B, N, D), c (B, D), mask (B, L + N) or None → context, x."""
        (cq, ck, cv), context_mod = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_mod = self.x_block.pre_attention(x, c)
        qkv = (torch.cat([cq, xq], dim=2), torch.cat([ck, xk], dim=2), torch.cat([cv, xv], dim=2))
        attended = _attend(qkv, mask)  # (B, L + N, D)
        length = context.shape[1]
        x = self.x_block.post_attention(x, attended[:, length:], x_mod)
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(context, attended[:, :length], context_mod)
        return context, x


class MMDiT(nn.Module):
    """v_θ(x_t, t, context, vector) by SD3's joint transformer; see `MMDiTConfig`."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        h, side = cfg.hidden_size, cfg.pos_embed_max_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, h, cfg.patch_size, stride=cfg.patch_size)
        # The grid of patch positions is part of the weights (SD3 stores its own); a new model starts from 2-D
        # sinusoids.
        self.register_buffer("pos_embed", grid_position_embedding(side, side, h)[None])  # (1, M·M, D)
        self.t_embedder = TimestepEmbedder(h)
        if cfg.adm_in_channels is not None:
            self.y_embedder = VectorEmbedder(cfg.adm_in_channels, h)
        self.context_embedder = nn.Linear(cfg.context_dim, h)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                for layer in (stream.attn.qkv, getattr(stream.attn, "proj", None), getattr(stream, "mlp", None)):
                    for linear in ([layer] if isinstance(layer, nn.Linear) else
                                   [] if layer is None else [layer.fc1, layer.fc2]):
                        nn.init.xavier_uniform_(linear.weight)
                        nn.init.zeros_(linear.bias)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None, vector: torch.Tensor | None) -> None:
        """Raise a clear error for inputs this network cannot take."""
        cfg, p = self.config, self.config.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, h, w) with h and w multiples of the patch "
                             f"size {p} (mmdit.in_channels counts concatenated conditions), got {tuple(x.shape)}")
        if max(x.shape[2], x.shape[3]) // p > cfg.pos_embed_max_size:
            raise ValueError(f"a latent of {x.shape[2]}×{x.shape[3]} is {x.shape[2] // p}×{x.shape[3] // p} patches: "
                             f"this MMDiT knows positions up to {cfg.pos_embed_max_size} patches a side "
                             f"(mmdit.pos_embed_max_size)")
        check_conditions(cfg, x.shape[0], t, context, context_mask, None, vector)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The centre rows×cols of the stored position grid, (rows·cols, D) (SD3's `cropped_pos_embed`)."""
        side = self.config.pos_embed_max_size
        top, left = (side - rows) // 2, (side - cols) // 2
        grid = self.pos_embed.reshape(side, side, -1)[top:top + rows, left:left + cols]
        return grid.reshape(rows * cols, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                residuals=None, extra_context: Mapping[str, torch.Tensor] | None = None,
                vector: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, h, w), t (B,) timesteps (fractional), context (B, L, context_dim) with mask (B, L), vector
        (B, adm_in_channels) → (B, C_out, h, w)."""
        if residuals is not None or extra_context or class_labels is not None:
            raise ValueError("an MMDiT backbone takes no control residuals, extra attention streams or class labels "
                             "(a class-conditional MMDiT reads its label as a condition token)")
        self.check_inputs(x, t, context, context_mask, vector)
        cfg, p = self.config, self.config.patch_size
        b, _, h, w = x.shape
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), N = (h/p)(w/p)
        tokens = tokens + self.positions(h // p, w // p).to(tokens.dtype)[None]
        c = self.t_embedder(t, tokens.dtype)  # (B, D)
        if vector is not None:
            c = c + self.y_embedder(vector.to(c.dtype))
        context = self.context_embedder(context.to(tokens.dtype))  # (B, L, D)
        mask = None
        if context_mask is not None and not bool(context_mask.all()):
            mask = torch.cat([context_mask, context_mask.new_ones(b, tokens.shape[1])], dim=1)  # (B, L + N)
        for block in self.joint_blocks:
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                context, tokens = checkpoint(block, context, tokens, c, mask, use_reentrant=False)
            else:
                context, tokens = block(context, tokens, c, mask)
        out = self.final_layer(tokens, c)  # (B, N, p·p·C_out)
        out = out.reshape(b, h // p, w // p, p, p, cfg.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, cfg.out_channels, h, w)  # (B, C_out, h, w)

