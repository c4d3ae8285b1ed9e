"""Convolutions computed another way at CPU inference: a 3×3 convolution of few pixels as one matrix product
(where oneDNN's direct kernels are slow), and upsampling ×2 + 3×3 convolution as one convolution of the input.
Functions of tensors; `layers.py` decides when the networks' layers use them, `bands.py` runs them on bands."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MATMUL_MAX_PIXELS = 512  # batch × height × width (of the output) at or below which the weights dominate
MATMUL_MIN_WEIGHTS = 8_000_000  # elements: 1280 → 1280 channels is 14.7 M (59 MB in fp32)
NHWC_WEIGHTS_FIRST_PIXELS = 256  # output pixels up to which `_nhwc_conv3x3_as_matmul` puts the weights first


def channels_last(x: torch.Tensor) -> bool:
    """Whether `x` (perhaps a band sliced out of a larger tensor) is laid out channels-last."""
    return x.shape[1] > 1 and x.stride(1) == 1


def strided(size: int, stride: int) -> int:
    """Output size of a padded 3×3 convolution along an axis of `size`."""
    return (size - 1) // stride + 1


def conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: int = 1) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding=1)` for 3×3 weights, as (C_out, 9·C_in) @ (9·C_in, B·H'·W'); for
    channels-last `x` and weights, `_nhwc_conv3x3_as_matmul`."""
    if channels_last(x) and channels_last(weight):
        return _nhwc_conv3x3_as_matmul(x, weight, bias, stride)
    b, c, h, w = x.shape
    out_channels, oh, ow = weight.shape[0], strided(h, stride), strided(w, stride)
    columns = _windows(x, 3, oh, ow, stride).view(c * 9, b * oh * ow)  # rows ordered (c, ky, kx) like weight's
    weight = weight.reshape(out_channels, -1)
    out = weight @ columns if bias is None else torch.addmm(bias[:, None], weight, columns)  # (C_out, B·H'·W')
    return out.view(out_channels, b, oh, ow).transpose(0, 1).contiguous()  # (B, C_out, H', W')


def _nhwc_conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: int = 1) -> torch.Tensor:
    """`conv3x3_as_matmul` of channels-last `x` and weights, in their own memory order: the (C_out, kh, kw, C_in)
    weights are a (C_out, 9·C_in) matrix as they lie, and the windows are gathered pixel by pixel,
    (B·H'·W', 9·C_in), so that the product comes out channels-last. oneDNN reorders a convolution's weights for
    AMX tiles at every call, which costs more than the product where pixels are few (SD's 8×8 level, batch 2,
    2-core Xeon with AMX: 2560 → 1280 channels 26 ms direct, 4.8 here; its 16×16 level 1920 → 1280, 27 against
    15). The larger operand goes first: the weights up to `NHWC_WEIGHTS_FIRST_PIXELS` output pixels (2.1 against
    3.0 ms at 1280 channels, 128 pixels), the windows beyond (9.2 against 16 at 512)."""
    b, c, h, w = x.shape
    out_channels, oh, ow = weight.shape[0], strided(h, stride), strided(w, stride)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H + 2, W + 2, C): a view, channels-last
    windows = x.new_empty(b, oh, ow, 3, 3, c)  # columns ordered (ky, kx, c) like the weights' memory
    for dy in range(3):
        for dx in range(3):
            windows[:, :, :, dy, dx] = padded[:, dy:dy + stride * (oh - 1) + 1:stride,
                                              dx:dx + stride * (ow - 1) + 1:stride]
    windows = windows.view(b * oh * ow, 9 * c)
    matrix = weight.permute(0, 2, 3, 1).reshape(out_channels, 9 * c)  # a view of channels-last weights
    if b * oh * ow <= NHWC_WEIGHTS_FIRST_PIXELS:
        out = matrix @ windows.t() if bias is None else torch.addmm(bias[:, None], matrix, windows.t())
        out = out.t().contiguous().view(b, oh, ow, out_channels)  # (C_out, pixels) → (B, H', W', C_out)
    else:
        out = windows @ matrix.t() if bias is None else torch.addmm(bias, windows, matrix.t())
        out = out.view(b, oh, ow, out_channels)
    return out.permute(0, 3, 1, 2)  # (B, C_out, H', W'), channels-last


def _windows(x: torch.Tensor, size: int, rows: int, cols: int, stride: int = 1) -> torch.Tensor:
    """(C, size, size, B, rows, cols): for each tap (dy, dx) of a size × size window sliding over `x` padded by one
    zero pixel, what it reads for `rows` × `cols` outputs `stride` apart (im2col by strided copies: 3-5× faster
    than `F.unfold`)."""
    b, c = x.shape[:2]
    padded = F.pad(x, (1, 1, 1, 1))
    columns = x.new_empty(c, size, size, b, rows, cols)
    for dy in range(size):
        for dx in range(size):
            window = padded[:, :, dy:dy + stride * (rows - 1) + 1:stride, dx:dx + stride * (cols - 1) + 1:stride]
            columns[:, dy, dx].copy_(window.transpose(0, 1))
    return columns


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      padding: tuple[int, int] = (1, 1), out: torch.Tensor | None = None) -> torch.Tensor:
    """A 3×3 convolution (padding 1) of `x` upsampled ×2 by nearest neighbour, computed from `x` itself.

    Each of the four output phases (even/odd row, even/odd column) reads a 2×2 neighbourhood of `x`, with the
    3×3 kernel's taps that fall on the same input pixel summed: one 2×2 convolution of `x` with 4 × C_out
    outputs, interleaved. 16 instead of 36 multiply-adds per input pixel and channel pair, and the upsampled
    input is never made: 2.3× faster for SD's UNet at 32² → 64², 1.7× for its decoder's (CI host, fp32). Equal to
    `F.conv2d(F.interpolate(x, scale_factor=2), weight, bias, padding=1)` up to rounding. Few pixels against
    large weights (as `layers.MatmulConv2d` takes them) go by `phases_as_matmuls`: SD's 16² → 32² at 1280
    channels, 1.5×.

    `padding` and `out`: as in `convolve_phases`, which takes the weights made once for many bands of rows."""
    if (padding, out) == ((1, 1), None) and x.dim() == 4 and x[:, 0].numel() <= MATMUL_MAX_PIXELS \
            and weight.numel() >= MATMUL_MIN_WEIGHTS:
        return phases_as_matmuls(x, weight, bias)
    return convolve_phases(x, *phase_weights(weight, bias), padding, out)


def phases_as_matmuls(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`upsampled_conv3x3` as four (4·C_out, C_in) @ (C_in, pixels) products, one per 2×2 tap (u, v), summed.

    Each tap's (4·C_out, C_in) weights, all four phases' (`_TAP_PHASES`), come out of one (16, 9) @ (9, C_out·C_in)
    product contiguous, where `phase_weights` needs a permuting copy: oneDNN is slow on few pixels, and this
    weight transform costs 35 ms instead of 87 at 1280 channels."""
    b, c, h, w = x.shape
    out_channels = weight.shape[0]
    taps = (_TAP_PHASES.to(weight.device) @ weight.float().reshape(out_channels * c, 9).t()).to(x.dtype)
    taps = taps.view(4, 4 * out_channels, c)  # [2u + v][phase · C_out + o][i]
    columns = _windows(x, 2, h + 1, w + 1).flatten(3)  # position (p, q) reads x[p - 1 + u, q - 1 + v]
    first = columns[:, 0, 0]  # (C_in, pixels)
    phases = taps[0] @ first if bias is None else torch.addmm(bias.repeat(4)[:, None], taps[0], first)
    for k in range(1, 4):
        phases.addmm_(taps[k], columns[:, k // 2, k % 2])
    return interleave_phases(phases.view(4 * out_channels, b, h + 1, w + 1).transpose(0, 1))  # (B, C_out, 2H, 2W)


def phase_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C_out, C_in, 3, 3) weights and their bias → the phases' (4·C_out, C_in, 2, 2) weights in fp32, phase
    (row, col) = 2·row + col (one matrix product with `_PHASE_TAPS`), and the bias repeated for each phase."""
    out_channels, in_channels = weight.shape[:2]
    taps = weight.float().reshape(out_channels * in_channels, 9) @ _PHASE_TAPS.to(weight.device)
    phases = taps.view(out_channels, in_channels, 4, 2, 2).permute(2, 0, 1, 3, 4)
    return phases.reshape(4 * out_channels, in_channels, 2, 2), None if bias is None else bias.repeat(4)


def convolve_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: tuple[int, int] = (1, 1), out: torch.Tensor | None = None) -> torch.Tensor:
    """`upsampled_conv3x3` with the weights from `phase_weights`.

    For bands of rows (`bands.py`): `padding` = (top, bottom) zero rows, 1 at the image's border
    and 0 where `x` holds one row of halo instead; the output has 2 × (rows of `x` + top + bottom − 2) rows,
    written into `out` when given (any dtype; the layout of the convolution's output otherwise)."""
    top, bottom = padding
    if top != bottom:
        x, top = F.pad(x, (0, 0, top, bottom)), 0
    phases = F.conv2d(x, weight.to(x.dtype), bias, padding=(top, 1))  # (B, 4·C_out, P, W + 1): p reads p-1, p
    return interleave_phases(phases, out)


def interleave_phases(phases: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, C, 2·(P − 1), 2·W) output from the four phases' (B, 4·C, P, W + 1) positions (phase-major channels;
    position (p, q) of phase (row, col) is output pixel (2·(p − row) + row, 2·(q − col) + col)), into `out` when
    given, else in the phases' layout."""
    channels = phases.shape[1] // 4
    b, positions, width = phases.shape[0], phases.shape[2], phases.shape[3] - 1
    if out is None:
        layout = torch.channels_last if channels_last(phases) else torch.contiguous_format
        out = torch.empty(b, channels, 2 * (positions - 1), 2 * width, dtype=phases.dtype, device=phases.device,
                          memory_format=layout)
    for row in range(2):
        for col in range(2):
            k = 2 * row + col
            out[:, :, row::2, col::2] = phases[:, k * channels:(k + 1) * channels, row:row + positions - 1,
                                               col:col + width]
    return out


# Along one axis, an even output of the upsampled convolution reads inputs (i−1, i) with taps (w0, w1 + w2) and
# an odd one (i, i+1) with (w0 + w1, w2): _AXIS[phase, input, tap]. In 2-D: rows (ky, kx) → (phase, u, v).
_AXIS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])
_PHASE_TAPS = torch.einsum("auy,cvx->yxacuv", _AXIS, _AXIS).reshape(9, 16)
_TAP_PHASES = _PHASE_TAPS.view(9, 4, 4).permute(2, 1, 0).reshape(16, 9)  # (u, v, phase) × (ky, kx)
