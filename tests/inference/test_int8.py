"""int8 weights (`precision="int8"`): the linear layers' by torchao, of the kind the host's instructions call for,
the convolutions' kept int8 and dequantised for their forward; outputs close to fp32 with the rest of the weights
in bf16 and fp32 math (the layerwise casts leave the int8 weights alone); the bundled model's pictures kept."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from conftest import BUNDLED_MODEL, randomised, tiny_unet_config
from latent_diffusion.inference import prepare_for_inference
from latent_diffusion.inference.int8 import int8_mode, quantize_convolutions, quantize_linears
from latent_diffusion.unet import UNetModel

pytest.importorskip("torchao")

CPU = torch.device("cpu")


AMX = {"amx_bf16": True, "amx_int8": True, "avx512_vnni": True}  # an AMX Xeon's flags, as far as the rule reads


@pytest.mark.parametrize("flags,mode", [(AMX, "weight"), ({"avx512_vnni": True}, "dynamic"),
                                        ({"avx_vnni": True}, "dynamic"), ({"avx512f": True}, "weight"), ({}, "weight")])
def test_the_kind_follows_the_hosts_matrix_instructions(flags, mode, monkeypatch):
    monkeypatch.delenv("LDM_INT8_MODE", raising=False)
    assert int8_mode(CPU, flags) == mode
    assert int8_mode(torch.device("cuda"), flags) == "dynamic"
    monkeypatch.setenv("LDM_INT8_MODE", "weight")
    assert int8_mode(CPU, {"avx512_vnni": True}) == "weight"
    monkeypatch.setenv("LDM_INT8_MODE", "dynamic")
    assert int8_mode(CPU, AMX) == "dynamic"
    monkeypatch.setenv("LDM_INT8_MODE", "int4")
    with pytest.raises(ValueError, match="LDM_INT8_MODE = 'int4': expected one of dynamic, weight"):
        int8_mode(CPU, flags)


def _unet_and_inputs():
    torch.manual_seed(0)  # the default init too: else each process draws another model, and the errors move with it
    unet = randomised(UNetModel(tiny_unet_config(model_channels=32, context_dim=32)), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    return unet, (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g))


@pytest.mark.parametrize("mode", ["dynamic", "weight"])
def test_linear_layers_become_int8_and_the_output_stays_close(mode):
    unet, (x, t, context) = _unet_and_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
    quantized = quantize_linears(copy.deepcopy(unet), mode)
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight.data) is not torch.Tensor for m in linears)
    convs = [m for m in quantized.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(type(m.weight.data) is torch.Tensor for m in convs)  # torchao: linear layers only
    with torch.no_grad():
        got = quantized(x, t, context)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert 0 < relative < 0.03


def test_convolutions_keep_int8_weights_and_dequantise_them_for_their_forward():
    unet, (x, t, context) = _unet_and_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
    quantized = quantize_convolutions(copy.deepcopy(unet), torch.float32)
    conv = quantized.input_blocks[0][0]
    assert "weight" not in dict(conv.named_parameters()) and conv.weight_int8.dtype == torch.int8
    assert conv.weight_scale.shape == (conv.out_channels, 1, 1, 1)
    reference = unet.input_blocks[0][0].weight
    assert ((conv.weight_int8 * conv.weight_scale - reference).abs() <= conv.weight_scale / 2 + 1e-7).all()
    with torch.no_grad():
        got = quantized(x, t, context)
    assert 0 < ((got - expected).norm() / expected.norm()).item() < 0.03


def test_int8_with_bf16_storage_and_fp32_math_leaves_the_int8_weights_alone():
    """On hosts whose bf16 math is slow the other weights are kept in bf16 and cast layer by layer for fp32 math;
    the int8 weights are not dequantised by those casts."""
    unet, (x, t, context) = _unet_and_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
    prepared = prepare_for_inference(copy.deepcopy(unet), CPU, torch.bfloat16, torch.float32, int8="weight")
    linear = next(m for m in prepared.modules() if isinstance(m, torch.nn.Linear))
    conv = next(m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d))
    norm = next(m for m in prepared.modules() if isinstance(m, torch.nn.GroupNorm))
    for _ in range(2):  # before and after a forward: int8 stays int8, the rest bf16
        assert type(linear.weight.data) is not torch.Tensor and linear.bias.dtype == torch.bfloat16
        assert conv.weight_int8.dtype == torch.int8 and not hasattr(conv, "weight")  # only inside its forward
        assert norm.weight.dtype == torch.bfloat16
        with torch.no_grad():
            got = prepared(x, t, context)
    # int8 weights, bf16 storage and fp32 math on this tiny random UNet: 2.0–3.5 % over ten draws, 3.0 % for this one
    assert got.dtype == torch.float32 and ((got - expected).norm() / expected.norm()).item() < 0.04


def test_the_bundled_model_draws_the_same_pictures_in_int8(bundled_pipe):
    from latent_diffusion.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(BUNDLED_MODEL, device="cpu", precision="int8")
    assert any(type(m.weight.data) is not torch.Tensor for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    kwargs = dict(steps=10, seed=0, progress=False)
    prompt = "a large red circle in the top left and a small blue square at the bottom"
    difference = (pipe.generate_tensors(prompt, **kwargs) - bundled_pipe.generate_tensors(prompt, **kwargs)).abs()
    assert difference.mean() < 0.02


def test_without_torchao_int8_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    unet, _ = _unet_and_inputs()
    with pytest.raises(ImportError, match="precision int8 needs torchao: pip install 'latent-diffusion\\[int8\\]'"):
        quantize_linears(unet, "weight")
