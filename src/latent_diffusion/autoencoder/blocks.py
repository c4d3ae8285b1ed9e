"""Building blocks of the first-stage autoencoder; attribute names mirror CompVis `diffusionmodules/model.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.inference.bands import (RowBands, band_rows, conv_in_bands, conv_weights, empty_output,
                                                math_dtype, norm_silu_rows, plain_rows, pointwise, run_layer)
from latent_diffusion.inference.conv import convolve_phases, phase_weights, upsample_by_phases, upsampled_conv3x3


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

    def forward_in_bands(self, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
        """`forward` (inference) computed in bands of rows: `bands.py`."""
        height, rows = x.shape[2], band_rows(bands, x, self.conv1.out_channels)
        h = conv_in_bands(self.conv1, norm_silu_rows(x, self.norm1, rows), height, rows, bands)
        if hasattr(self, "nin_shortcut"):
            shortcut = lambda r0, r1: pointwise(self.nin_shortcut, x[:, :, r0:r1])
        else:
            shortcut = lambda r0, r1: x[:, :, r0:r1]
        return conv_in_bands(self.conv2, norm_silu_rows(h, self.norm2, rows), height, rows, bands,
                             residual=shortcut)  # (B, C_out, H, W)


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

    def forward_in_bands(self, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
        rows = band_rows(bands, x, x.shape[1])
        return conv_in_bands(self.conv, plain_rows(x), x.shape[2], rows, bands, downsample=True)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv: H → 2H. At CPU inference both are one convolution of the
    input (`nn.conv.upsampled_conv3x3`: 2.25× fewer FLOPs, and the upsampled input is never made)."""

    cast_as_one = True  # `runtime.store_weights`: the conv's weights are cast before `forward` reads them

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if upsample_by_phases(x):
            return upsampled_conv3x3(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def forward_in_bands(self, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
        """`forward` a band of input rows at a time (each read with a row of halo above and below)."""
        height, rows = x.shape[2], band_rows(bands, x, x.shape[1], scale=4)
        weight, bias = conv_weights(self.conv)
        out = empty_output(x, weight.shape[0], 2 * height, 2 * x.shape[3], bands.storage or math_dtype(weight))
        phases = phase_weights(weight, bias)  # made once for all the bands
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            convolve_phases(x[:, :, max(r0 - 1, 0):r1 + 1].to(weight.dtype), *phases,
                            padding=(int(r0 == 0), int(r1 == height)), out=out[:, :, 2 * r0:2 * r1])
        return out  # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """ResNet → self-attention → ResNet at the lowest resolution (`mid.block_1/attn_1/block_2`)."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))

    def forward_in_bands(self, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
        h = run_layer(self.attn_1, self.block_1.forward_in_bands(x, bands), bands)
        return self.block_2.forward_in_bands(h, bands)
