"""The networks' layers computed another way at CPU inference, swapped in by `swap_inference_layers`.

Each inference class subclasses a network's layer: the same parameters, state dict keys and outputs (up to
rounding). Its forward takes the fast path only where it pays and only at eager CPU inference
(`eager_cpu_inference`); training, other devices, tracing (OpenVINO converts the plain graph) and `torch.compile`
run the plain forward it inherits. A model that is never swapped runs its plain forward everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from latent_diffusion import unet
from latent_diffusion.autoencoder import blocks
from latent_diffusion.inference import conv
from latent_diffusion.inference.bands import math_dtype
from latent_diffusion.inference.precision import amx_bf16_tiles
from latent_diffusion.nn.attention import FeedForward

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
        hooked = self.conv._forward_pre_hooks or self.conv._forward_hooks
        return (doubles and not hooked and eager_cpu_inference(x) and not onednn_direct(x)
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
        if not eager_cpu_inference(x) or tokens <= 2 * chunk:
            return super().forward(x)
        chunks = x.reshape(tokens, x.shape[-1]).split(chunk)
        return torch.cat([self.net(chunk) for chunk in chunks]).view(x.shape)  # (B, N, D)

    def chunk_tokens(self, x: torch.Tensor) -> int:
        """Tokens per chunk: `AMX_CHUNK_TOKENS` where the products run in bf16 on AMX tiles, else `CHUNK_TOKENS`."""
        return self.AMX_CHUNK_TOKENS if onednn_direct(self.net[0].proj.weight) else self.CHUNK_TOKENS


# network layer class → its inference class (exact types: a subclass may compute something else)
INFERENCE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: MatmulConv2d,
    unet.Upsample: PhaseUpsample,
    blocks.Upsample: PhaseDecoderUpsample,
    FeedForward: ChunkedFeedForward,
}


def swap_inference_layers(module: nn.Module) -> nn.Module:
    """`module` with each layer of a class in `INFERENCE_CLASSES` made an instance of its inference class, in
    place: the same parameters, the same state dict keys."""
    for layer in module.modules():
        inference_class = INFERENCE_CLASSES.get(type(layer))
        if inference_class is not None:
            layer.__class__ = inference_class
    return module
