"""LoRA attaches to any Linear or Conv2d from outside: it adds (α/r)·s·B A, the network is untouched; fused and
unfused, the weights come back bit for bit."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.config import UNetConfig
from latent_diffusion.nn.lora import LoRA, LowRank, LowRankWeights
from latent_diffusion.unet import UNetModel


def _tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=2, context_dim=16, norm_groups=8)
    unet = UNetModel(cfg).eval()
    for p in unet.parameters():  # zero-initialised output layers would hide what an adapter changes
        nn.init.normal_(p, std=0.05)
    return unet


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]),
            torch.randn(2, 5, 16, generator=g))


def _train_up(lora: LoRA) -> None:
    for adapter in lora.adapters:
        nn.init.normal_(adapter.up.weight, std=0.1)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                   nn.Conv2d(3, 4, 1)], ids=["linear", "conv3x3-stride2", "conv1x1"])
def test_the_update_is_alpha_over_rank_times_scale_times_up_down(layer):
    lora = LoRA(nn.Sequential(layer), ["0"], rank=2, alpha=3.0, scale=0.5)
    _train_up(lora)
    adapter = lora.adapters[0]
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 9, 9)
    delta = 0.5 * 3.0 / 2 * adapter.up.weight.flatten(1) @ adapter.down.weight.flatten(1)
    weight = layer.weight + delta.view_as(layer.weight)
    expected = F.linear(x, weight, layer.bias) if isinstance(layer, nn.Linear) else \
        F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_a_new_adapter_changes_nothing_and_the_state_dict_stays_the_networks():
    unet = _tiny_unet()
    keys = list(unet.state_dict())
    with torch.no_grad():
        before = unet(*_inputs())
        LoRA(unet, lambda name, _: ".attn2.to_" in name, rank=4)
        assert torch.equal(unet(*_inputs()), before)
    assert list(unet.state_dict()) == keys


def test_detach_restores_and_merge_bakes_in_the_same_outputs():
    unet = _tiny_unet()
    with torch.no_grad():
        plain = unet(*_inputs())
        lora = LoRA(unet, lambda name, layer: isinstance(layer, nn.Conv2d) or "attn" in name, rank=2, scale=0.7)
        _train_up(lora)
        adapted = unet(*_inputs())
        assert (adapted - plain).abs().max() > 1e-3
        lora.detach()
        assert torch.equal(unet(*_inputs()), plain)
        lora.attach()
        lora.merge()
        torch.testing.assert_close(unet(*_inputs()), adapted, rtol=1e-4, atol=1e-4)


def test_only_the_adapters_train():
    unet = _tiny_unet().train()
    unet.requires_grad_(False)
    lora = LoRA(unet, lambda name, _: name.endswith("attn2.to_k") or name.endswith("attn2.to_v"), rank=2)
    _train_up(lora)
    unet(*_inputs()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_loras_stack():
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    first, second = LoRA(nn.Sequential(layer), ["0"], 1), LoRA(nn.Sequential(layer), ["0"], 2)
    _train_up(first)
    _train_up(second)
    expected = F.linear(x, layer.weight + first.adapters[0].delta_weight() + second.adapters[0].delta_weight(),
                        layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match=r"not in the model: \['nope'\]"):
        LoRA(nn.Sequential(nn.Linear(2, 2)), ["nope"], 1)
    with pytest.raises(ValueError, match="no layer of the model matches"):
        LoRA(nn.Sequential(nn.Linear(2, 2)), lambda name, _: False, 1)
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d layers, got LayerNorm"):
        LowRank(nn.LayerNorm(3), 1)
    with pytest.raises(ValueError, match="rank = 0"):
        LowRank(nn.Linear(2, 2), 0)


def _factors(layer: nn.Module, rank: int, alpha: float | None, seed: int = 0) -> LowRankWeights:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        shapes = (rank, layer.in_features), (layer.out_features, rank)
    else:
        shapes = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return LowRankWeights(*(torch.randn(s, generator=g) for s in shapes), alpha)


def test_factors_of_a_linear_fit_a_1x1_convolution_and_the_reverse():
    """An SD 1.x LoRA's `proj_in` (1×1 conv factors) on an SD 2.x-style Linear `proj_in`, and the reverse."""
    linear, conv = nn.Linear(6, 5), nn.Conv2d(6, 5, 1)
    conv.weight.data, conv.bias.data = linear.weight.data.view(5, 6, 1, 1).clone(), linear.bias.data.clone()
    as_conv = _factors(conv, 3, 1.5)
    as_linear = LowRankWeights(as_conv.down.flatten(1), as_conv.up.flatten(1), 1.5)
    x = torch.randn(4, 6)
    expected = F.linear(x, linear.weight + 0.5 * as_linear.up @ as_linear.down, linear.bias)
    for layer, weights in ((linear, as_conv), (conv, as_linear), (linear, as_linear)):
        lora = LoRA.from_weights(nn.Sequential(layer), {"0": weights})
        got = layer(x) if layer is linear else layer(x[:, :, None, None]).flatten(1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        lora.detach()


def test_locon_factors_adapt_a_strided_3x3_convolution():
    """LoCon: down has the layer's 3×3 kernel, stride and padding, up is 1×1 (kohya networks/lora.py LoRAModule)."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    weights = _factors(conv, 2, None)  # no α: α = r, a scale of 1
    LoRA.from_weights(nn.Sequential(conv), {"0": weights}, scale=0.5)
    x = torch.randn(2, 3, 9, 9)
    delta = (weights.up.flatten(1) @ weights.down.flatten(1)).view_as(conv.weight)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight + 0.5 * delta, conv.bias, 2, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer,weights,message", [
    (nn.Linear(6, 5), LowRankWeights(torch.zeros(2, 7), torch.zeros(5, 2)),
     r"down \(2, 7\), up \(5, 2\) do not fit Linear 6 → 5: expected down \(2, 6\), up \(5, 2\)"),
    (nn.Conv2d(6, 5, 3), LowRankWeights(torch.zeros(2, 6), torch.zeros(5, 2)),
     r"expected down \(2, 6, 3, 3\), up \(5, 2\)"),
    (nn.Linear(6, 5), LowRankWeights(torch.zeros(2, 6), torch.zeros(5, 3)), "not the factors A .* of one rank r"),
    (nn.LayerNorm(6), LowRankWeights(torch.zeros(2, 6), torch.zeros(6, 2)), "not LayerNorm"),
], ids=["width", "kernel", "ranks", "layer-kind"])
def test_factors_that_do_not_fit_name_the_layer_and_the_shapes_expected(layer, weights, message):
    assert re.search(message, LowRank.mismatch(layer, weights))
    with pytest.raises(ValueError, match=r"1 LoRA layers do not fit the model, e\.g\. \['0: "):
        LoRA.from_weights(nn.Sequential(layer), {"0": weights})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_gives_the_on_the_fly_outputs_and_unfuse_restores_the_weights_bit_for_bit(dtype):
    unet = _tiny_unet().to(dtype)
    weights = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    with torch.no_grad():
        plain = unet(*(t.to(dtype) for t in _inputs()))
        lora = LoRA(unet, lambda name, layer: isinstance(layer, nn.Conv2d) or "attn" in name, rank=2, scale=0.7)
        _train_up(lora)
        on_the_fly = unet(*(t.to(dtype) for t in _inputs()))
        lora.fuse()
        assert lora.fused and not lora._hooks
        fused = unet(*(t.to(dtype) for t in _inputs()))
        lora.unfuse()
        unfused = unet(*(t.to(dtype) for t in _inputs()))
    change = (on_the_fly - plain).abs().max().item()
    # fp32: the same to rounding; bf16: the fused weights are rounded to bf16 once, the branch is computed in fp32
    tolerance = 1e-5 if dtype == torch.float32 else change / 4
    assert change > 1e-3 and (fused - on_the_fly).abs().max().item() <= tolerance
    assert torch.equal(unfused, on_the_fly)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in unet.state_dict().items())
    lora.detach()
    with torch.no_grad():
        assert torch.equal(unet(*(t.to(dtype) for t in _inputs())), plain)


def test_fused_loras_unfuse_in_reverse_order():
    layer = nn.Linear(4, 4)
    original = layer.weight.data.clone()
    storage = layer.weight.data_ptr()
    first = LoRA.from_weights(nn.Sequential(layer), {"0": _factors(layer, 2, 1.0, seed=1)})
    second = LoRA.from_weights(nn.Sequential(layer), {"0": _factors(layer, 3, 6.0, seed=2)}, scale=-0.5)
    first.fuse()
    second.fuse()
    expected = original + first.adapters[0].delta_weight() - 0.5 * second.adapters[0].delta_weight()
    torch.testing.assert_close(layer.weight.data, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="unfuse the 1 LoRA\\(s\\) fused after this one"):
        first.unfuse()
    second.unfuse()
    first.unfuse()
    assert layer.weight.data_ptr() == storage and torch.equal(layer.weight.data, original)


def test_a_lora_writes_back_its_factors_and_alpha():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    weights = _factors(layer, 2, 5.0)
    adapter = LoRA.from_weights(nn.Sequential(layer), {"0": weights}).by_layer()["0"]
    again = adapter.weights()
    assert torch.equal(again.down, weights.down) and torch.equal(again.up, weights.up) and again.alpha == 5.0
