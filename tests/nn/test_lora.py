"""LoRA attaches to any Linear or Conv2d from outside: the update it adds is (α/r)·s·B A, the network is untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.config import UNetConfig
from latent_diffusion.nn.lora import LoRA, LowRank
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
