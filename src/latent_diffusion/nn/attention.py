"""The spatial transformer of LDM (paper §3.3): self-attention, cross-attention to condition tokens, GEGLU MLP.

Attribute names mirror CompVis `ldm/modules/attention.py`, so Stable Diffusion UNet weights load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.nn.embeddings import grid_position_embedding


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
        self.streams = nn.ModuleDict()  # extra key/value streams by name (`KVStream`); none in the paper's model

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                extra_context: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, D), context (B, L, Dc), mask (B, L) bool with True = attend; `extra_context` holds the tokens
        (B, L', D') of the `streams` by name (a stream without tokens in this call adds nothing)."""
        return self.to_out(self.attend(x, context, mask, extra_context))  # (B, N, D)

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               extra_context: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The heads' outputs side by side, before `to_out`: (B, N, h·d)."""
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (self._heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))  # (B, h, ·, d)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        for name, stream in self.streams.items():
            tokens = (extra_context or {}).get(name)
            if tokens is not None:
                k, v = self._heads(stream.to_k(tokens)), self._heads(stream.to_v(tokens))
                out = out + stream.scale * F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, -1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, h·d) → (B, h, L, d)."""
        return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)


class KVStream(nn.Module):
    """Other tokens that a cross-attention layer attends to with its own queries, through keys and values of
    their own, the result added with weight `scale`: IP-Adapter's decoupled cross-attention (Ye et al. 2023,
    eq. 5), Attention(Q, K, V) + λ·Attention(Q, K', V'). Added to a layer as `attention.streams[name]`."""

    def __init__(self, context_dim: int, inner_dim: int, scale: float = 1.0):
        super().__init__()
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.scale = scale


class GEGLU(nn.Module):
    """x ↦ a · GELU(g) with [a, g] = proj(x) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU → dropout → Linear, 4× wide (`ff.net.0.proj`, `ff.net.2`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, N, D)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention to the condition, GEGLU feed-forward.

    With `disable_self_attn` the first attention reads the condition too (CompVis' `disable_self_attn`, diffusers'
    `only_cross_attention`: SD's x4 upscaler at its outer levels).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0,
                 disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                extra_context: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        first = (context, mask) if self.disable_self_attn else ()  # the condition's tokens, or x's own
        x = x + self.attn1(self.norm1(x), *first)
        x = x + self.attn2(self.norm2(x), context, mask, extra_context)
        return x + self.ff(self.norm3(x))  # (B, N, D)


class SpatialTransformer(nn.Module):
    """GroupNorm → proj_in → depth × BasicTransformerBlock over the H·W tokens → proj_out, plus the input.

    :param use_linear: Linear projections (SD 2.x) instead of 1×1 convolutions (SD 1.x).
    :param position_embedding: add fixed 2-D sinusoidal position codes to the tokens after proj_in (not in the
        paper or SD; no parameters): cross-attention can then bind words like "left" to places directly.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False, norm_groups: int = 32,
                 position_embedding: bool = False, disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear, self.position_embedding = use_linear, position_embedding
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                extra_context: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
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
            hidden = block(hidden, context, mask, extra_context)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(1, 2).reshape(hidden.shape[0], -1, h, w)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return x + hidden  # (B, C, H, W)
