"""A trainable transformer on the frozen text tokens: the learned part of τ_θ.

The LDM paper trains its text encoder τ_θ with the UNet; Stable Diffusion freezes CLIP. `ContextAdapter` sits
between the two: the pretrained encoder stays frozen (and cacheable) and a few transformer layers trained with the
UNet rewrite its token states. Each token can then carry what its phrase says: "circle" learns that it is the
yellow one in the centre, which a frozen sentence encoder's token states do not make explicit enough for
cross-attention to bind attributes to the right object.

Every layer is a pre-LayerNorm residual block whose output projections start at zero, so a new adapter is the
identity: a trained UNet can be fine-tuned with one without losing what it knows.
"""

from __future__ import annotations

from torch import nn

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.nn.attention import CrossAttention, FeedForward


class _AdapterLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, None, heads, dim // heads)
        self.ff = FeedForward(dim, mult=2)
        for last in (self.attn.to_out[0], self.ff.net[2]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class ContextAdapter(nn.Module):
    """Conditioning (B, L, D) → Conditioning (B, L, D): `layers` self-attention blocks over the real tokens.

    :param dim: the text encoder's token width (also the output width).
    :param layers: number of blocks (≥ 1).
    :param head_dim: channels per attention head; `dim` must be a multiple of it.
    """

    def __init__(self, dim: int, layers: int, head_dim: int = 64):
        super().__init__()
        if layers < 1 or dim % head_dim:
            raise ValueError(f"ContextAdapter: expected layers >= 1 and dim a multiple of head_dim={head_dim}, "
                             f"got layers={layers}, dim={dim}")
        self.dim = dim
        self.layers = nn.ModuleList(_AdapterLayer(dim, dim // head_dim) for _ in range(layers))

    def forward(self, cond: Conditioning) -> Conditioning:
        tokens = cond.tokens
        for layer in self.layers:
            tokens = layer(tokens, cond.mask)
        return Conditioning(tokens * cond.mask[..., None].to(tokens.dtype), cond.mask)  # padding stays zero
