"""The inference layer: every speed and memory technique of this package, applied to a network from outside by
one call (`prepare_for_inference`), each tested against the network's plain forward; and the UNet's execution
backends: PyTorch ("torch"), OpenVINO ("openvino", `openvino.py`), AOTInductor ("inductor", `inductor.py`), or
whichever is measured fastest among PyTorch and those whose compiled graph is cached ("auto", the default,
`auto.py`; what the compiled ones share: `compiled.py`).

    conv.py       3×3 convolutions as matmuls, ×2 upsampling + convolution by phases (functions of tensors)
    layers.py     the networks' layers that use them at eager CPU inference, swapped in by class
    bands.py      the autoencoder run in bands of rows (less memory)
    precision.py  weights stored in bf16, math in bf16 or fp32 by rule (layerwise casting)
    int8.py       linear layers' weights in int8 by torchao (dynamic int8 products or weight-only, by rule)
    memory.py     channels-last on a CPU (the UNet: where bf16 runs on AMX tiles), the C heap's free pages given back
"""

from __future__ import annotations

import torch
from torch import nn

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.inference.bands import inference_bands, use_bands
from latent_diffusion.inference.compiled import CompiledUNet
from latent_diffusion.inference.inductor import InductorUNet
from latent_diffusion.inference.int8 import quantize_convolutions, quantize_linears
from latent_diffusion.inference.layers import swap_inference_layers
from latent_diffusion.inference.memory import channels_last_on_cpu, unet_channels_last
from latent_diffusion.inference.openvino import OpenVINOUNet
from latent_diffusion.inference.precision import store_weights
from latent_diffusion.unet import UNetModel

# the backends that compile the UNet with its weights, by name
COMPILED: dict[str, type[CompiledUNet]] = {backend.name: backend for backend in (OpenVINOUNet, InductorUNet)}
BACKENDS = ("auto", "torch", *COMPILED)


def prepare_for_inference(module: nn.Module, device: torch.device, storage: torch.dtype = torch.float32,
                          math: torch.dtype = torch.float32, row_bands: bool = True,
                          int8: str | None = None) -> nn.Module:
    """`module` on `device` in eval mode, made ready for inference in place: its layers swapped for their
    inference classes (`layers.py`); a `UNetModel` channels-last where `math` is bf16 on AMX tiles
    (`memory.unet_channels_last`); an `AutoencoderKL` channels-last on a CPU and run in bands of rows
    (`bands.py`; `row_bands=False`: whole layers, for measurements); with `int8` ("dynamic" or "weight",
    `int8.int8_mode`) its linear and convolution layers' weights made int8 (`int8.py`); its other weights kept in
    `storage` and computed at `math` (`precision.store_weights`). The same parameters and state dict keys (int8:
    the convolutions' weights become `weight_int8` and `weight_scale`), and the same outputs up to rounding (int8:
    up to quantisation); with gradients on, the plain forward."""
    module = swap_inference_layers(module.to(device).eval())
    if isinstance(module, UNetModel):
        module = unet_channels_last(module, device, math)
    if isinstance(module, AutoencoderKL):
        module = channels_last_on_cpu(module, device)
        if row_bands:
            module = use_bands(module, inference_bands(device, storage))
    if int8 is not None:
        module = quantize_convolutions(quantize_linears(module, int8, math), math)
    return store_weights(module, storage, math)


def check_backend(backend: str, device: torch.device, precision: str = "fp32", math: str | None = None) -> None:
    """A clear error for an unknown backend or one that cannot run on `device` at `precision`, computed at `math`
    (default: `precision`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
    problem = COMPILED[backend].problem(device, precision, math or precision) if backend in COMPILED else None
    if problem is not None:
        raise ValueError(problem)
