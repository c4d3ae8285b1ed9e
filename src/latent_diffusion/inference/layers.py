"""The networks' layers computed another way at CPU inference, swapped in by `swap_inference_layers`.

Each inference class subclasses a network's layer: the same parameters, state dict keys and outputs (up to
rounding). Its forward takes the fast path only where it pays and only at eager CPU inference
(`eager_cpu_inference`); training, other devices, tracing (OpenVINO converts the plain graph) and `torch.compile`
run the plain forward it inherits. A model that is never swapped runs its plain forward everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from latent_diffusion import unet
from latent_diffusion.autoencoder import blocks
from latent_diffusion.inference import conv
from latent_diffusion.inference.bands import math_dtype
from latent_diffusion.inference.precision import amx_bf16_tiles
from latent_diffusion.nn.attention import BasicTransformerBlock, FeedForward

# batch × height × width of the input from which `upsampled_conv3x3` pays for its per-call weight transform
PHASES_MIN_PIXELS = 512


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether `x` is being computed on by PyTorch's eager CPU kernels without gradients: where the fast paths
    (tuned against oneDNN's kernels) apply. Not when traced (OpenVINO) or compiled."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def onednn_direct(x: torch.Tensor) -> bool:
    """Whether `x` is convolved in bf16 on AMX tiles (bf16 tensors or bf16 autocast, `precision.amx_bf16_tiles`).
    There oneDNN's own kernels beat upsampling by phases (SD 1.5's UNet, batch 2, 64² latents, channels-last,
    2-core Xeon with AMX: 1.82 s without the phase path, 2.01 with it; the VAE decodes 512² in 2.80 s without,
    2.83 with) and NCHW convolutions as matmuls; channels-last ones of few pixels still go by their matmul
    (`MatmulConv2d`)."""
    return math_dtype(x) == torch.bfloat16 and amx_bf16_tiles()


def hooked(*layers: nn.Module) -> bool:
    """Whether any of `layers` carries forward hooks (a LoRA's): a fast path that calls past a layer must not."""
    return any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)


@functools.cache
def linear_pointwise_available() -> bool:
    """Whether this PyTorch and CPU have oneDNN's bf16 linear with fused bias and element-wise operations
    (`torch.ops.mkldnn._linear_pointwise`, what Inductor calls on a CPU)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def dense_bf16(*tensors: torch.Tensor) -> bool:
    """Whether each of `tensors` is a plain bf16 tensor (not a tensor subclass such as torchao's int8 weights)."""
    return all(type(t) in (torch.Tensor, nn.Parameter) and t.dtype == torch.bfloat16 for t in tensors)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  gelu: bool = False) -> torch.Tensor:
    """`F.linear` of a 2-D `x` by oneDNN, the bias added in its product (`addmm` copies the bias into the whole
    output first), and with `gelu` the exact GELU of the result applied there too, before its rounding to the
    output's dtype; `linear_pointwise_available` must hold."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "none" if gelu else "")


def onednn_linear_then(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: str,
                       other: torch.Tensor) -> torch.Tensor:
    """`onednn_linear(x, weight, bias)` then `+ other` (`op` "add") or `· other` ("mul") in the same oneDNN product,
    one rounding (`other` of the output's shape)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, op)


class MatmulConv2d(nn.Conv2d):
    """`nn.Conv2d` that computes a padded 3×3 convolution (stride 1 or 2) of few pixels with large weights as one
    matrix product over its unfolded input (`conv.conv3x3_as_matmul`).

    The SD 1.5 UNet's 8×8 level at batch 2 has 128 pixels against 1280 × 1280 × 9 weights. oneDNN convolves
    that at ~40–120 GFLOP/s; one (C_out, 9·C_in) × (9·C_in, pixels) product streams the weights once at
    ~210: its 14 convolutions take 0.29 s instead of 0.55 s here, and its downsampling from 16×16 16 ms
    instead of 34. Where pixels are many the direct kernels win (≥ 1.5× at 32×32): `conv.MATMUL_MAX_PIXELS`.
    In bf16 on AMX tiles (`onednn_direct`) only channels-last inputs and weights go by the product (its
    channels-last form), which spares oneDNN's reordering of the weights at every call: SD 1.5's UNet (batch 2,
    64² latents, 2-core Xeon with AMX) 1.96 → 1.80 s, the path switched off and on in one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_matmul(x):
            return conv.conv3x3_as_matmul(x, self.weight, self.bias, self.stride[0])
        return super().forward(x)

    def as_matmul(self, x: torch.Tensor) -> bool:
        """Whether this call goes by `conv3x3_as_matmul`."""
        stride = self.stride[0]
        return (eager_cpu_inference(x) and x.dim() == 4
                and (not onednn_direct(x) or conv.channels_last(x) and conv.channels_last(self.weight))
                and self.kernel_size == (3, 3) and self.stride in ((1, 1), (2, 2)) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and x.shape[0] * conv.strided(x.shape[2], stride) * conv.strided(x.shape[3], stride)
                <= conv.MATMUL_MAX_PIXELS
                and self.weight.numel() >= conv.MATMUL_MIN_WEIGHTS)


class PhaseUpsampling:
    """The forward of both networks' `Upsample` (×2 nearest, then the 3×3 `conv`) as one convolution of the input
    by phases (`conv.upsampled_conv3x3`: 2.25× fewer FLOPs, and the upsampled input is never made), from
    `PHASES_MIN_PIXELS` input pixels (below, as at SD's 8×8 level with 1280 channels, the per-call weight
    transform costs what the FLOPs save). Not where hooks on `conv` (a LoRA's) expect it to be called."""

    cast_as_one = True  # `precision.store_weights`: the conv's weights are cast before `forward` reads them
    conv: nn.Conv2d

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.by_phases(x, size):
            return conv.upsampled_conv3x3(x, self.conv.weight, self.conv.bias)
        return super().forward(x) if size is None else super().forward(x, size)

    def by_phases(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> bool:
        """Whether this call goes by `upsampled_conv3x3`."""
        doubles = size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3])
        return (doubles and not hooked(self.conv) and eager_cpu_inference(x) and not onednn_direct(x)
                and x.shape[0] * x.shape[2] * x.shape[3] >= PHASES_MIN_PIXELS)


class PhaseUpsample(PhaseUpsampling, unet.Upsample):
    """The UNet's `Upsample` by phases."""


class PhaseDecoderUpsample(PhaseUpsampling, blocks.Upsample):
    """The autoencoder decoder's `Upsample` by phases."""


class ChunkedFeedForward(FeedForward):
    """`FeedForward` that takes long token sequences in chunks of `CHUNK_TOKENS`: the GEGLU's 8×-wide
    intermediates (84 MB per call at SD's 64×64 level, batch 2) then stay in cache between the projection, the
    GELU, the product and the down-projection. Same output; 134 → 84 ms per call at that level on the CI host.
    bf16 products on AMX tiles want more rows per product: there chunks of `AMX_CHUNK_TOKENS` (SD's 64×64 level,
    Xeon with AMX, 2 cores: 28.9 ms per call in chunks of 512, 22.5 of 1024, 20.4 of 2048, 31.0 whole)."""

    CHUNK_TOKENS = 512
    AMX_CHUNK_TOKENS = 2048
    cast_as_one = True  # `precision.store_weights` casts its weights once per call, not once per chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, chunk = x.shape[:-1].numel(), self.chunk_tokens(x)
        if self.by_halves(x):
            return self.geglu_by_halves(x.reshape(tokens, x.shape[-1]), chunk).view(x.shape)
        if not eager_cpu_inference(x) or tokens <= 2 * chunk:
            return super().forward(x)
        chunks = x.reshape(tokens, x.shape[-1]).split(chunk)
        return torch.cat([self.net(chunk) for chunk in chunks]).view(x.shape)  # (B, N, D)

    def by_halves(self, x: torch.Tensor) -> bool:
        """Whether this call goes by `geglu_by_halves`: bf16 products on AMX tiles at eager inference, weights
        and input plain bf16 tensors (nothing cast, not int8), no hooks on the layers it bypasses (a LoRA's)."""
        geglu, down = self.net[0], self.net[2]
        return (not self.training and eager_cpu_inference(x) and onednn_direct(x) and linear_pointwise_available()
                and dense_bf16(x, geglu.proj.weight, down.weight)
                and not hooked(*self.net.modules()))

    def geglu_by_halves(self, x: torch.Tensor, chunk: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The feed-forward of `x` (tokens, D), `chunk` tokens at a time, with the GEGLU's projection as two
        products, one per half: the gate's with its GELU, then `a`'s times it, each done in oneDNN's product (no
        pass of its own over the 4×-wide intermediate), and the down-projection written into the output, plus
        `residual` (tokens, D) where given. SD 1.5's levels on a 2-core Xeon with AMX, per call: 27 ms against 45
        for projection, GELU and product one after the other at 64×64, 21 against 23 at 32×32, 14 against 16 at
        16×16; the whole UNet forward 1–3 % faster with the residuals fused too (A/B in one process)."""
        proj, down = self.net[0].proj, self.net[2]
        half = proj.out_features // 2
        a_weight, gate_weight = proj.weight[:half], proj.weight[half:]
        a_bias, gate_bias = (None, None) if proj.bias is None else (proj.bias[:half], proj.bias[half:])
        out = x.new_empty(x.shape[0], down.out_features)
        for start in range(0, x.shape[0], chunk):
            rows = x[start:start + chunk]
            gate = onednn_linear(rows, gate_weight, gate_bias, gelu=True)
            gated = onednn_linear_then(rows, a_weight, a_bias, "mul", gate)
            if residual is None:
                out[start:start + chunk] = onednn_linear(gated, down.weight, down.bias)
            else:
                out[start:start + chunk] = onednn_linear_then(gated, down.weight, down.bias, "add",
                                                              residual[start:start + chunk])
        return out

    def chunk_tokens(self, x: torch.Tensor) -> int:
        """Tokens per chunk: `AMX_CHUNK_TOKENS` where the products run in bf16 on AMX tiles, else `CHUNK_TOKENS`."""
        return self.AMX_CHUNK_TOKENS if onednn_direct(self.net[0].proj.weight) else self.CHUNK_TOKENS


class ResidualFusedTransformerBlock(BasicTransformerBlock):
    """`BasicTransformerBlock` whose three residual additions oneDNN makes inside the products before them (each
    attention's `to_out`, the feed-forward's down-projection: `onednn_linear_then`) where bf16 products run on AMX
    tiles, instead of a pass of its own over the tokens each. Not where hooks on the layers it calls past (a
    LoRA's on `to_out` or the feed-forward's) expect them to be called."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                extra_context: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if not self.fuses(x):
            return super().forward(x, context, mask, extra_context)
        first = (context, mask) if self.disable_self_attn else ()
        x = self._out(self.attn1, self.attn1.attend(self.norm1(x), *first), x)
        x = self._out(self.attn2, self.attn2.attend(self.norm2(x), context, mask, extra_context), x)
        tokens = x.reshape(-1, x.shape[-1])
        h = self.norm3(x)
        return self.ff.geglu_by_halves(h.reshape(tokens.shape), self.ff.chunk_tokens(h), tokens).view(x.shape)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether this call adds the residuals in the products: as `ChunkedFeedForward.by_halves`, for each
        projection it calls past."""
        bypassed = (self.attn1, self.attn1.to_out, self.attn1.to_out[0], self.attn2, self.attn2.to_out,
                    self.attn2.to_out[0], self.ff)
        return (isinstance(self.ff, ChunkedFeedForward) and self.ff.by_halves(x)
                and dense_bf16(self.attn1.to_out[0].weight, self.attn2.to_out[0].weight)
                and not hooked(*bypassed))

    @staticmethod
    def _out(attention: nn.Module, heads: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + attention.to_out(heads)`, as one product."""
        out = attention.to_out[0]
        return onednn_linear_then(heads.reshape(-1, heads.shape[-1]), out.weight, out.bias, "add",
                                  residual.reshape(-1, residual.shape[-1])).view(residual.shape)


# network layer class → its inference class (exact types: a subclass may compute something else)
INFERENCE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: MatmulConv2d,
    unet.Upsample: PhaseUpsample,
    blocks.Upsample: PhaseDecoderUpsample,
    FeedForward: ChunkedFeedForward,
    BasicTransformerBlock: ResidualFusedTransformerBlock,
}


def swap_inference_layers(module: nn.Module) -> nn.Module:
    """`module` with each layer of a class in `INFERENCE_CLASSES` made an instance of its inference class, in
    place: the same parameters, the same state dict keys."""
    for layer in module.modules():
        inference_class = INFERENCE_CLASSES.get(type(layer))
        if inference_class is not None:
            layer.__class__ = inference_class
    return module
