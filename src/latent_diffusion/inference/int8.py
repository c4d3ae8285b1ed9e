"""int8 weights at inference (`precision="int8"`): the UNet's and the text encoder's linear layers by torchao, the
UNet's convolutions weight-only; per output channel, symmetric; a quarter of their fp32 memory, half of bf16's.

Linear layers, by rule from the host (no timing; `LDM_INT8_MODE=dynamic|weight` decides over it):
- "weight" (`Int8WeightOnlyConfig`: the weights dequantised in the product) where bf16 products run on AMX tiles:
  there a bf16 product beats quantising every activation for an int8 one (SD 1.5's UNet, batch 2, 64² latents,
  2-core Xeon with AMX: 2.66 s per forward against 4.31, in 1,623 MiB against 1,736), and where the CPU has no
  int8 matrix instructions;
- "dynamic" (torchao's `Int8DynamicActivationInt8WeightConfig`: activations quantised per token at run time, int8 ×
  int8 matrix products) where it has them without AMX bf16 tiles (AVX-512 or AVX VNNI), and on CUDA.
Convolutions (torchao has no int8 convolution): the int8 weights are dequantised to the math dtype for the length
of the layer's forward (`Int8Weights`), one layer's copy at a time. Norms and embeddings keep the storage dtype.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from latent_diffusion.inference.precision import cpu_capabilities

log = logging.getLogger(__name__)

INT8_MODE_VARIABLE = "LDM_INT8_MODE"
INT8_MODES = ("dynamic", "weight")
MIN_FEATURES = 16  # smaller layers (a tiny test model's) gain nothing and torchao's kernels want some width


def int8_mode(device: torch.device, capabilities: Mapping[str, object] | None = None) -> str:
    """"dynamic" or "weight" for this device, as LDM_INT8_MODE says when set, else by the rule above."""
    forced = os.environ.get(INT8_MODE_VARIABLE)
    if forced is not None and forced not in INT8_MODES:
        raise ValueError(f"{INT8_MODE_VARIABLE} = {forced!r}: expected one of {', '.join(INT8_MODES)}")
    if forced is not None:
        mode, why = forced, f"{INT8_MODE_VARIABLE}={forced}"
    elif device.type == "cuda":
        mode, why = "dynamic", "CUDA multiplies int8 in hardware"
    else:
        flags = cpu_capabilities() if capabilities is None else capabilities
        vnni = [name for name in ("amx_int8", "avx512_vnni", "avx_vnni") if flags.get(name)]
        if flags.get("amx_bf16"):
            mode, why = "weight", "the CPU has AMX bf16 tiles: bf16 products there beat quantising each activation"
        elif vnni:
            mode, why = "dynamic", f"the CPU has {vnni[0]}"
        else:
            mode, why = "weight", "no int8 matrix instructions"
    _log_once(f"int8 linear layers: {mode} ({why})")
    return mode


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def quantize_linears(module: nn.Module, mode: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`module` with the weights of its `nn.Linear` layers (both sides at least MIN_FEATURES) made int8 by torchao,
    in place; their bias, and the dtype their products come out in, is `dtype` (the math's)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ImportError("precision int8 needs torchao: pip install 'latent-diffusion[int8]' (or torchao)") from exc
    if mode not in INT8_MODES:
        raise ValueError(f"int8 mode = {mode!r}: expected one of {', '.join(INT8_MODES)}")
    config = Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()
    for layer in module.modules():  # one layer at a time in `dtype`: never the whole network in fp32
        if isinstance(layer, nn.Linear) and min(layer.in_features, layer.out_features) >= MIN_FEATURES:
            quantize_(layer.to(dtype), config)
    return module


class Int8Weights:
    """A layer's `weight` kept as int8 values (`weight_int8`) and one scale per output channel (`weight_scale`):
    `weight` exists only during the layer's forward, dequantised to `dtype` (forward hooks)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        weight = layer.weight.detach().float()
        scale = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True).clamp(min=1e-12) / 127
        del layer.weight  # the parameter goes: the int8 buffers replace it
        layer.register_buffer("weight_int8", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        layer.register_buffer("weight_scale", scale.to(dtype))
        layer.register_forward_pre_hook(self.dequantize)
        layer.register_forward_hook(self.release, always_call=True)

    @staticmethod
    def dequantize(layer: nn.Module, args) -> None:
        layer.weight = layer.weight_int8.to(layer.weight_scale.dtype) * layer.weight_scale

    @staticmethod
    def release(layer: nn.Module, args, output) -> None:
        del layer.weight


def quantize_convolutions(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`module` with the weights of its `nn.Conv2d` layers of at least MIN_FEATURES output channels kept in int8
    and dequantised to `dtype` (the math's) in their forward (`Int8Weights`), in place."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and layer.out_channels >= MIN_FEATURES:
            Int8Weights(layer, dtype)
    return module
