"""The autoencoder at inference in bands of rows: the same output in a fraction of the memory (`use_bands`).

At 512² the decoder's full-resolution layers hold tensors of 256 channels × 512² (256 MiB in fp32), and a plain
forward keeps three of them alive at once (input, normalised input, activation) plus the output. A convolution
only needs its input one row beyond each output row, and GroupNorm + SiLU act on each pixel alone once the
group statistics are known; so `conv_in_bands` computes a layer's output a band of rows at a time from the
matching rows of its input (with a one-row halo), and only the layer's input and output are ever whole.

`RowBands.storage` also lets the activations *between* layers be stored in another dtype than the math runs at
(bf16 storage, fp32 math on CPUs whose bf16 matmuls are slow): each band is computed in fp32 and stored in bf16,
half the memory at fp32 speed. Under bf16 autocast the GroupNorm + SiLU between them runs in bf16 too (one
rounding of the fp32 result, as the convolution would cast its input anyway): the SD VAE decodes 512² in 1.9 s
instead of 3.0 on a 2-core Xeon with AMX, OpenVINO's time there. Inference only: the layers' dropout is skipped.

`use_bands` makes an `AutoencoderKL` run so: its encoder and decoder become `BandedEncoder`/`BandedDecoder`, whose
forward walks the network layer by layer (`layer_in_bands`, one function per layer type) when no gradient is
taken, and is the plain `Encoder`/`Decoder` forward otherwise. The model classes know nothing of bands.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.autoencoder.blocks import Downsample, MidBlock, ResnetBlock, Upsample
from latent_diffusion.autoencoder.model import AutoencoderKL, Decoder, Encoder
from latent_diffusion.inference.conv import channels_last, convolve_phases, phase_weights

# rows_of(a, b): rows a..b of a layer's input, computed on demand
Rows = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class RowBands:
    """How `Encoder`/`Decoder` run in bands: `elements` bounds one band (4M elements: 16 MiB in fp32);
    `storage` is the dtype of the activations kept between layers (None: the dtype the math produces). Outside
    autocast the math is fp32 (weights stored narrower are cast layer by layer: `precision.store_weights`)."""

    elements: int = 1 << 22
    storage: torch.dtype | None = None

    def store(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as kept between layers."""
        return x if self.storage is None else x.to(self.storage)


def math_input(x: torch.Tensor) -> torch.Tensor:
    """`x` for a layer run whole: as it is under autocast (which casts), else in fp32."""
    return x if _autocast(x.device) else x.float()


def _autocast(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def inference_bands(device: torch.device, weights: torch.dtype) -> RowBands:
    """The bands `Pipeline` encodes and decodes in: 4M-element bands on a CPU (16 MiB in fp32; no slower than whole
    layers there), 64M on a GPU (whole layers up to 512², bands beyond); activations stored in the weights' dtype
    when it is narrower than fp32 (bf16 storage, whatever the math)."""
    elements = 1 << 22 if device.type == "cpu" else 1 << 26
    return RowBands(elements, storage=None if weights == torch.float32 else weights)


def use_bands(autoencoder: AutoencoderKL, bands: RowBands) -> AutoencoderKL:
    """`autoencoder`, whose `encode`/`decode` now run in `bands` when no gradient is taken (the plain forward when
    one is): its encoder and decoder become `BandedEncoder`/`BandedDecoder`, with the same parameters and state dict."""
    if not isinstance(autoencoder, AutoencoderKL):
        raise TypeError(f"bands of rows run an AutoencoderKL's encoder and decoder, not a {type(autoencoder).__name__}")
    for part, plain, banded in ((autoencoder.encoder, Encoder, BandedEncoder),
                                (autoencoder.decoder, Decoder, BandedDecoder)):
        if type(part) not in (plain, banded):
            raise TypeError(f"cannot run a {type(part).__name__} in bands of rows: expected a {plain.__name__}")
        part.__class__ = banded
        part.bands = bands
    return autoencoder


class _InBands:
    """The forward of an inference subclass: the plain one while a gradient is taken, else `run_in_bands`."""

    bands: RowBands
    run_in_bands: Callable[[torch.Tensor, RowBands], torch.Tensor]  # a method: `encode_in_bands`, `decode_in_bands`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.run_in_bands(x, self.bands)


def encode_in_bands(encoder: Encoder, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """`encoder(x)` in bands of rows, in the math dtype (as the plain forward gives it to `quant_conv`)."""
    rows = band_rows(bands, x, encoder.conv_in.out_channels)
    h = conv_in_bands(encoder.conv_in, plain_rows(x), x.shape[2], rows, bands)
    for layer in (*_layers(encoder.down), encoder.mid):
        h = layer_in_bands(layer, h, bands)  # each layer's input freed as the next one starts
    return math_input(_out_in_bands(encoder.norm_out, encoder.conv_out, h, bands))  # (B, 2·z, H/f, W/f)


def decode_in_bands(decoder: Decoder, z: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """`decoder(z)` in bands of rows, in `bands.storage` (or the math dtype)."""
    h = layer_in_bands(decoder.conv_in, z, bands)
    for layer in (decoder.mid, *_layers(reversed(decoder.up))):
        h = layer_in_bands(layer, h, bands)  # each layer's input freed as the next one starts
    return _out_in_bands(decoder.norm_out, decoder.conv_out, h, bands)  # (B, out, H, W)


class BandedEncoder(_InBands, Encoder):
    """`Encoder` whose forward runs in bands of rows when no gradient is taken (`use_bands`)."""

    run_in_bands = encode_in_bands


class BandedDecoder(_InBands, Decoder):
    """`Decoder` whose forward runs in bands of rows when no gradient is taken (`use_bands`)."""

    run_in_bands = decode_in_bands


def _layers(levels: Iterable[nn.Module]) -> list[nn.Module]:
    """The resolution levels' layers in the order they run."""
    return [layer for level in levels for layer in level.layers()]


@functools.singledispatch
def layer_in_bands(layer: nn.Module, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """`layer(x)` in bands of rows, by the layer's type. A layer of no type registered below (attention, the
    decoder's conv_in at the latent's size) runs whole, with its input in the math dtype and its output stored."""
    return bands.store(layer(math_input(x)))


@layer_in_bands.register(ResnetBlock)
def _resnet_in_bands(block: ResnetBlock, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    height, rows = x.shape[2], band_rows(bands, x, block.conv1.out_channels)
    h = conv_in_bands(block.conv1, norm_silu_rows(x, block.norm1, rows), height, rows, bands)
    if hasattr(block, "nin_shortcut"):
        shortcut = lambda r0, r1: pointwise(block.nin_shortcut, x[:, :, r0:r1])
    else:
        shortcut = lambda r0, r1: x[:, :, r0:r1]
    return conv_in_bands(block.conv2, norm_silu_rows(h, block.norm2, rows), height, rows, bands,
                         residual=shortcut)  # (B, C_out, H, W)


@layer_in_bands.register(Downsample)
def _downsample_in_bands(layer: Downsample, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    rows = band_rows(bands, x, x.shape[1])
    return conv_in_bands(layer.conv, plain_rows(x), x.shape[2], rows, bands, downsample=True)  # (B, C, H/2, W/2)


@layer_in_bands.register(Upsample)
def _upsample_in_bands(layer: Upsample, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """×2 nearest + 3×3 conv by phases (`conv.convolve_phases`), a band of input rows at a time (each read with a
    row of halo above and below)."""
    height, rows = x.shape[2], band_rows(bands, x, x.shape[1], scale=4)
    weight, bias = conv_weights(layer.conv)
    out = empty_output(x, weight.shape[0], 2 * height, 2 * x.shape[3], bands.storage or math_dtype(weight))
    phases = phase_weights(weight, bias)  # made once for all the bands
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        convolve_phases(x[:, :, max(r0 - 1, 0):r1 + 1].to(weight.dtype), *phases,
                        padding=(int(r0 == 0), int(r1 == height)), out=out[:, :, 2 * r0:2 * r1])
    return out  # (B, C, 2H, 2W)


@layer_in_bands.register(MidBlock)
def _mid_in_bands(block: MidBlock, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    h = layer_in_bands(block.attn_1, layer_in_bands(block.block_1, x, bands), bands)
    return layer_in_bands(block.block_2, h, bands)


def _out_in_bands(norm: nn.GroupNorm, conv: nn.Conv2d, h: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """conv(silu(norm(h))) in bands: the last layers of the encoder and the decoder."""
    rows = band_rows(bands, h, h.shape[1])
    return conv_in_bands(conv, norm_silu_rows(h, norm, rows), h.shape[2], rows, bands)


def group_stats(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of each (sample, group) of `x` in fp32, shaped (B, G): by PyTorch's own GroupNorm kernel
    a band at a time where `x` is bf16 (`_one_pass_stats`), else in two passes over bands, each summing per channel
    (fast on channels-last tensors, unlike `var_mean` over a group's channels and pixels at once)."""
    if x.dtype == torch.bfloat16:
        return _one_pass_stats(x, norm, rows)
    b, c, h, w = x.shape
    g = norm.num_groups
    count = c // g * h * w
    starts = range(0, h, rows)
    total = sum(x[:, :, r:r + rows].sum((2, 3), dtype=torch.float32) for r in starts)  # (B, C)
    mean = (total.view(b, g, c // g).sum(-1) / count).view(b, g, 1, 1, 1)
    squares = sum((grouped(x[:, :, r:r + rows], g) - mean).square_().sum((3, 4)) for r in starts)  # (B, G, C/G)
    return mean.view(b, g), squares.sum(-1) / count


def _one_pass_stats(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_stats` of a bf16 `x`: each band's by `torch.native_group_norm` (its output unused), combined as Chan
    et al. combine variances. That kernel sums x and x² in one pass in fp32 (on channels-last tensors), which loses
    the variance of a group whose mean is ~10⁴ times its deviation; bf16 data cannot hold such a group (its
    values are rounded to 1 part in 256), so here the single pass costs nothing bf16 has not lost already, and
    takes a 128 × 512² layer's statistics in ~15 ms instead of ~60 (2-core Xeon with AMX)."""
    b, c, h, w = x.shape
    g, layout = norm.num_groups, torch.channels_last if channels_last(x) else torch.contiguous_format
    ones = torch.ones(c, device=x.device)  # fp32 parameters: the statistics come in fp32
    counts, means, variances = [], [], []
    for r in range(0, h, rows):
        band = x[:, :, r:r + rows]
        pixels = band.shape[2] * w
        stats = [torch.native_group_norm(band[i:i + 1].contiguous(memory_format=layout), ones, None, 1, c, pixels,
                                         g, norm.eps)[1:] for i in range(b)]  # a sample's rows: no copy if CL
        counts.append(pixels)
        means.append(torch.cat([mean for mean, _ in stats]))  # (B, G)
        variances.append(torch.cat([rstd for _, rstd in stats]).pow(-2).sub_(norm.eps).clamp_(min=0))
    mean = sum(n * m for n, m in zip(counts, means)) / (h * w)
    return mean, sum(n * (v + (m - mean).square()) for n, m, v in zip(counts, means, variances)) / (h * w)


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, h, W) → (B, G, C/G, h, W), a view."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w)


def norm_silu_rows(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> Rows:
    """rows(a, b) = silu(norm(x))[:, :, a:b] in the math dtype (autocast's bf16, else fp32), with `norm`'s
    statistics taken over the whole of `x`. The normalisation is an inference `batch_norm` per sample, whose
    kernel takes bf16 rows with fp32 statistics and rounds once (x · scale + shift computed in fp32)."""
    per_channel = x.shape[1] // norm.num_groups
    mean, variance = (s.repeat_interleave(per_channel, dim=1) for s in group_stats(x, norm, rows))  # (B, C)
    weight, bias = norm.weight.float(), norm.bias.float()
    bf16_math = _autocast(x.device) and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
    compute = torch.bfloat16 if bf16_math else torch.float32

    def rows_of(a: int, b: int) -> torch.Tensor:
        band = x[:, :, a:b].to(compute)
        y = [F.batch_norm(band[i:i + 1], mean[i], variance[i], weight, bias, False, 0.0, norm.eps)
             for i in range(band.shape[0])]
        return F.silu(y[0] if len(y) == 1 else torch.cat(y), inplace=True)

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
    layout = torch.channels_last if channels_last(like) else torch.contiguous_format
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

