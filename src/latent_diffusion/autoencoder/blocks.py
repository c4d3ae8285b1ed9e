"""Building blocks of the first-stage autoencoder; attribute names mirror CompVis `diffusionmodules/model.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as in CompVis (eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → dropout → conv, plus a (1×1) shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h  # (B, C_out, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1-conv q/k/v/proj_out (SDPA kernel)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Strided 3×3 conv with CompVis' asymmetric (0, 1, 0, 1) padding: H → H/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv: H → 2H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """ResNet → self-attention → ResNet at the lowest resolution (`mid.block_1/attn_1/block_2`)."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))
