"""The spatial transformer of LDM (paper §3.3): self-attention, cross-attention to condition tokens, GEGLU MLP.

Attribute names mirror CompVis `ldm/modules/attention.py`, so Stable Diffusion UNet weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.nn.embeddings import grid_position_embedding
from latent_diffusion.runtime import eager_cpu_inference


def repeat_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x repeated along its first axis to `batch` entries (x, x, …, x): the tensors of latents shared by several
    conditions (`UNetModel.forward`), for all of them."""
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *(1,) * (x.ndim - 1))


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over `context` (x itself when None), with an optional key mask."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), context (B, L, Dc), mask (B, L) bool with True = attend."""
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, ·, d)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)


class GEGLU(nn.Module):
    """x ↦ a · GELU(g) with [a, g] = proj(x) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU → dropout → Linear, 4× wide (`ff.net.0.proj`, `ff.net.2`).

    At CPU inference, long token sequences go through in chunks of `CHUNK_TOKENS`: the GEGLU's 8×-wide
    intermediates (84 MB per call at SD's 64×64 level, batch 2) then stay in cache between the projection, the
    GELU, the product and the down-projection. Same output; 134 → 84 ms per call at that level on the CI host.
    `runtime.store_weights` casts its weights once per call (`cast_as_one`), not once per chunk."""

    CHUNK_TOKENS = 512
    cast_as_one = True

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[:-1].numel()
        if not eager_cpu_inference(x) or tokens <= 2 * self.CHUNK_TOKENS:
            return self.net(x)
        chunks = x.reshape(tokens, x.shape[-1]).split(self.CHUNK_TOKENS)
        return torch.cat([self.net(chunk) for chunk in chunks]).view(x.shape)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention to the condition, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if context is not None:  # latents shared by several conditions meet them here (`UNetModel.forward`)
            x = repeat_batch(x, context.shape[0])
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))  # (B, N, D)


class SpatialTransformer(nn.Module):
    """GroupNorm → proj_in → depth × BasicTransformerBlock over the H·W tokens → proj_out, plus the input.

    :param use_linear: Linear projections (SD 2.x) instead of 1×1 convolutions (SD 1.x).
    :param position_embedding: add fixed 2-D sinusoidal position codes to the tokens after proj_in (not in the
        paper or SD; no parameters): cross-attention can then bind words like "left" to places directly.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False, norm_groups: int = 32,
                 position_embedding: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear, self.position_embedding = use_linear, position_embedding
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[2:]
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C); one copy here saves one per LayerNorm
        if self.use_linear:
            hidden = self.proj_in(hidden)
        if self.position_embedding:
            hidden = hidden + grid_position_embedding(h, w, hidden.shape[-1], hidden.device, hidden.dtype)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, mask)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(1, 2).reshape(hidden.shape[0], -1, h, w)  # x's batch, or more where x was shared
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return repeat_batch(x, hidden.shape[0]) + hidden  # (B, C, H, W)
