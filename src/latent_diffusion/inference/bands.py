"""Inference of the autoencoder's convolutions in bands of rows: the same output in a fraction of the memory.

At 512² the decoder's full-resolution layers hold tensors of 256 channels × 512² (256 MiB in fp32), and a plain
forward keeps three of them alive at once (input, normalised input, activation) plus the output. A convolution
only needs its input one row beyond each output row, and GroupNorm + SiLU act on each pixel alone once the
group statistics are known; so `conv_in_bands` computes a layer's output a band of rows at a time from the
matching rows of its input (with a one-row halo), and only the layer's input and output are ever whole.

`RowBands.storage` also lets the activations *between* layers be stored in another dtype than the math runs at
(bf16 storage, fp32 math on CPUs whose bf16 matmuls are slow): each band is computed in fp32 and stored in bf16,
half the memory at fp32 speed. Inference only: the layers' dropout is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# rows_of(a, b): rows a..b of a layer's input, computed on demand
Rows = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class RowBands:
    """How `Encoder`/`Decoder` run in bands: `elements` bounds one band (4M elements: 16 MiB in fp32);
    `storage` is the dtype of the activations kept between layers (None: the dtype the math produces). Outside
    autocast the math is fp32 (weights stored narrower are cast layer by layer: `runtime.store_weights`)."""

    elements: int = 1 << 22
    storage: torch.dtype | None = None

    def store(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as kept between layers."""
        return x if self.storage is None else x.to(self.storage)


def run_layer(layer: nn.Module, h: torch.Tensor, bands: RowBands | None) -> torch.Tensor:
    """layer(h): whole when `bands` is None, else in bands of rows where the layer has `forward_in_bands`, and
    whole otherwise (attention, low-resolution convs) with its input in the math dtype and its output stored."""
    if bands is None:
        return layer(h)
    if hasattr(layer, "forward_in_bands"):
        return layer.forward_in_bands(h, bands)
    return bands.store(layer(math_input(h)))


def math_input(x: torch.Tensor) -> torch.Tensor:
    """`x` for a layer run whole: as it is under autocast (which casts), else in fp32."""
    return x if _autocast(x.device) else x.float()


def _autocast(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def inference_bands(device: torch.device, weights: torch.dtype) -> RowBands:
    """The bands `Pipeline` decodes in: 4M-element bands on a CPU (16 MiB in fp32; no slower than whole
    layers there), 64M on a GPU (whole layers up to 512², bands beyond); activations stored in the weights' dtype
    when it is narrower than fp32 (bf16 storage, whatever the math)."""
    elements = 1 << 22 if device.type == "cpu" else 1 << 26
    return RowBands(elements, storage=None if weights == torch.float32 else weights)


def group_stats(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) of each (sample, group) of `x` in fp32, shaped (B, G, 1, 1, 1) to broadcast over
    `grouped(x)`: two passes over bands, each summing per channel (fast on channels-last tensors, unlike
    `var_mean` over a group's channels and pixels at once)."""
    b, c, h, w = x.shape
    g = norm.num_groups
    count = c // g * h * w
    starts = range(0, h, rows)
    total = sum(x[:, :, r:r + rows].sum((2, 3), dtype=torch.float32) for r in starts)  # (B, C)
    mean = (total.view(b, g, c // g).sum(-1) / count).view(b, g, 1, 1, 1)
    squares = sum((grouped(x[:, :, r:r + rows], g) - mean).square_().sum((3, 4)) for r in starts)  # (B, G, C/G)
    return mean, torch.rsqrt(squares.sum(-1) / count + norm.eps).view(b, g, 1, 1, 1)


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, h, W) → (B, G, C/G, h, W), a view."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w)


def norm_silu_rows(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> Rows:
    """rows(a, b) = silu(norm(x))[:, :, a:b] in fp32, with `norm`'s statistics taken over the whole of `x`."""
    b, c = x.shape[:2]
    mean, rstd = group_stats(x, norm, rows)  # (B, G, 1, 1, 1)
    scale = (rstd.view(b, -1, 1) * norm.weight.float().view(1, norm.num_groups, -1)).view(b, c, 1, 1)
    shift = norm.bias.float().view(1, c, 1, 1) - mean.view(b, -1, 1).expand(b, -1, c // norm.num_groups
                                                                              ).reshape(b, c, 1, 1) * scale

    def rows_of(a: int, b: int) -> torch.Tensor:
        y = torch.addcmul(shift, x[:, :, a:b].float(), scale)  # norm(x) = x · scale + shift, per channel
        return F.silu(y, inplace=True)

    return rows_of


def plain_rows(x: torch.Tensor) -> Rows:
    """rows(a, b) = x[:, :, a:b] in fp32."""
    return lambda a, b: x[:, :, a:b].float()


def conv_in_bands(conv: nn.Conv2d, rows_of: Rows, height: int, rows: int, bands: RowBands, downsample: bool = False,
                  residual: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """conv(input) + residual, `rows` output rows at a time: `rows_of(a, b)` gives rows a..b of the conv's input
    (`height` rows), `residual(r0, r1)` rows of what is added to its output. For 1×1 convolutions, 3×3 ones with
    padding 1, and (`downsample`) the encoder's stride-2 3×3 after CompVis' (0, 1, 0, 1) padding. The output
    takes the memory format the convolution gives (channels-last for channels-last weights)."""
    k, stride = conv.kernel_size[0], conv.stride[0]
    halo = 0 if downsample else k // 2
    out_height = (height - 1) // 2 + 1 if downsample else height
    weight, bias = conv_weights(conv)
    out = None
    for r0 in range(0, out_height, rows):
        r1 = min(out_height, r0 + rows)
        a, b = r0 * stride - halo, (r1 - 1) * stride + k - halo  # the input rows these outputs read
        band = rows_of(max(a, 0), min(b, height))
        if downsample:  # CompVis' asymmetric padding, the bottom row only where the band reaches it
            band = F.pad(band, (0, 1, 0, max(0, b - height)))
            y = F.conv2d(band, weight, bias, stride=stride)
        else:  # at the image's top or bottom the conv pads rows itself, computing one row more than kept
            pad = halo if a < 0 or b > height else 0
            y = F.conv2d(band, weight, bias, padding=(pad, halo))
            skip = a - max(a, 0) + pad  # output rows before r0
            y = y[:, :, skip:skip + r1 - r0]
        if out is None:
            out = empty_output(y, y.shape[1], out_height, y.shape[3], bands.storage or y.dtype)
        if residual is not None:
            y = y + residual(r0, r1).to(y.dtype)  # same dtypes: mixed-dtype adds take a slow path
        out[:, :, r0:r1] = y
    return out


def conv_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`conv`'s weight and bias in the math dtype (as stored under autocast, which casts them; else fp32)."""
    weight = conv.weight if _autocast(conv.weight.device) else conv.weight.float()
    return weight, None if conv.bias is None else conv.bias.to(weight.dtype)


def math_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer's output comes in, for `weight` from `conv_weights`: autocast's when it is on."""
    return torch.get_autocast_dtype(weight.device.type) if _autocast(weight.device) else weight.dtype


def empty_output(like: torch.Tensor, channels: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A layer's whole (B, `channels`, `height`, `width`) output to fill band by band, laid out like `like` (a
    band of its input or output: channels-last or not)."""
    layout = torch.channels_last if _channels_last(like) else torch.contiguous_format
    return torch.empty((like.shape[0], channels, height, width), device=like.device, dtype=dtype,
                       memory_format=layout)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 `conv` of `x` (a band) in the math dtype."""
    weight, bias = conv_weights(conv)
    return F.conv2d(x.to(weight.dtype), weight, bias)


def band_rows(bands: RowBands, x: torch.Tensor, channels_out: int, scale: int = 1) -> int:
    """Output rows per band of a layer reading `x` and writing `channels_out` channels at `scale` × its width:
    the band's input and output each within `bands.elements`."""
    per_row = x.shape[0] * max(x.shape[1], channels_out) * x.shape[3] * scale
    return max(1, bands.elements // per_row)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether `x` (perhaps a band sliced out of a larger tensor) is laid out channels-last."""
    return x.shape[1] > 1 and x.stride(1) == 1
