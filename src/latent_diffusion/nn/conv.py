"""A 3×3 convolution that multiplies one matrix where oneDNN's direct kernels are slow on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.runtime import eager_cpu_inference

MATMUL_MAX_PIXELS = 512  # batch × height × width at or below which the weights, not the pixels, dominate
MATMUL_MIN_WEIGHTS = 8_000_000  # elements: 1280 → 1280 channels is 14.7 M (59 MB in fp32)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same state dict) that, at CPU inference, computes a padded 3×3 stride-1
    convolution of few pixels with large weights as one matrix product over its unfolded input (im2col).

    The SD 1.5 UNet's 8×8 level at batch 2 has 128 pixels against 1280 × 1280 × 9 weights. oneDNN convolves
    that at ~40–120 GFLOP/s; one (C_out, 9·C_in) × (9·C_in, pixels) product streams the weights once at
    ~210: its 14 convolutions take 0.29 s instead of 0.55 s here. Where pixels are many the direct kernels
    win (≥ 1.5× at 32×32), hence the limits above. Training, other devices, tracing and `torch.compile` run
    the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._as_matmul(x):
            return conv3x3_as_matmul(x, self.weight, self.bias)
        return super().forward(x)

    def _as_matmul(self, x: torch.Tensor) -> bool:
        return (eager_cpu_inference(x) and x.dim() == 4
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and x.shape[0] * x.shape[2] * x.shape[3] <= MATMUL_MAX_PIXELS
                and self.weight.numel() >= MATMUL_MIN_WEIGHTS)


def conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for 3×3 weights, as (C_out, 9·C_in) @ (9·C_in, B·H·W)."""
    b, c, h, w = x.shape
    out_channels = weight.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    columns = x.new_empty(c, 3, 3, b, h, w)  # rows ordered (c, ky, kx) like weight's; 3-5× faster than F.unfold
    for dy in range(3):
        for dx in range(3):
            columns[:, dy, dx].copy_(padded[:, :, dy:dy + h, dx:dx + w].transpose(0, 1))
    columns = columns.view(c * 9, b * h * w)
    weight = weight.reshape(out_channels, -1)
    out = weight @ columns if bias is None else torch.addmm(bias[:, None], weight, columns)  # (C_out, B·H·W)
    return out.view(out_channels, b, h, w).transpose(0, 1).contiguous()  # (B, C_out, H, W)
