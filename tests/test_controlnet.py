"""The ControlNet network: one residual per input block shaped like that block's output and one for the middle
block; started from a UNet it is that UNet's encoder (weights copied, the hint entering after the first
convolution) and adds exactly nothing; scales, guess mode's weights, and clear errors for inputs that do not fit."""

from __future__ import annotations

import pytest
import torch

from latent_diffusion.controlnet import ControlNet, ControlNetConfig, guess_mode_scales
from latent_diffusion.unet import Residuals, UNetModel

from conftest import randomised, tiny_unet_config


def unet_block_outputs(unet: UNetModel, x, t, context) -> list[torch.Tensor]:
    """The outputs of the UNet's input blocks, then of its middle block."""
    outputs = []
    hooks = [block.register_forward_hook(lambda _, __, out: outputs.append(out))
             for block in [*unet.input_blocks, unet.middle_block]]
    with torch.no_grad():
        unet(x, t, context)
    for hook in hooks:
        hook.remove()
    return outputs


def inputs(batch: int = 2, size: int = 8, factor: int = 8):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, size, size, generator=generator), torch.tensor([3.0, 917.0][:batch]),
            torch.rand(batch, 3, size * factor, size * factor, generator=generator),
            torch.randn(batch, 5, 8, generator=generator))


@pytest.fixture(scope="module")
def unet():
    return randomised(UNetModel(tiny_unet_config(num_res_blocks=2)), 0)


def residuals(net: ControlNet, *args, **kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = net(*args, **kwargs)
    return [*out.skips, out.middle]


def test_one_residual_per_input_block_shaped_like_its_output_and_one_for_the_middle(unet):
    x, t, hint, context = inputs()
    net = randomised(ControlNet.from_unet(unet), 1)
    got = residuals(net, x, t, hint, context)
    expected = unet_block_outputs(unet, x, t, context)
    assert [r.shape for r in got] == [e.shape for e in expected] and len(got) == len(unet.input_blocks) + 1
    assert all(r.abs().max() > 1e-3 for r in got)


def test_from_unet_copies_the_encoder_and_adds_nothing_until_trained(unet):
    net = ControlNet.from_unet(unet)
    ours, theirs = net.state_dict(), unet.state_dict()
    shared = [k for k in ours if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")]
    assert len(shared) > 20 and all(torch.equal(ours[k], theirs[k]) for k in shared)
    x, t, hint, context = inputs()
    got = residuals(net, x, t, hint, context)
    assert all(torch.count_nonzero(r) == 0 for r in got)
    with torch.no_grad():
        plain = unet(x, t, context)
        controlled = unet(x, t, context, residuals=Residuals(skips=got[:-1], middle=got[-1]))
    assert torch.equal(controlled, plain)


def test_the_copy_computes_the_unets_features_and_the_hint_enters_after_the_first_convolution(unet):
    """Zero convolutions set to the identity show the features: the UNet's own, while the hint encoder's last
    convolution is zero; with it awake, the first block's output moves by exactly the encoded hint."""
    net = ControlNet.from_unet(unet)
    with torch.no_grad():
        for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0]]:
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    x, t, hint, context = inputs()
    for got, expected in zip(residuals(net, x, t, hint, context), unet_block_outputs(unet, x, t, context),
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    randomised(net.input_hint_block, 2)
    with torch.no_grad():
        encoded = net.input_hint_block(hint, None)  # (B, ch, h, w)
        first = unet.input_blocks[0](x, None)
    torch.testing.assert_close(residuals(net, x, t, hint, context)[0], first + encoded, rtol=0, atol=1e-5)


def test_an_inpainting_unets_controlnet_reads_the_latents_alone():
    unet = randomised(UNetModel(tiny_unet_config(in_channels=9, concat_channels=5)), 0)
    net = ControlNet.from_unet(unet)
    assert net.config.unet.in_channels == 4 and net.config.unet.concat_channels == 0
    assert torch.equal(net.input_blocks[0][0].weight, unet.input_blocks[0][0].weight[:, :4])


def test_scales_multiply_the_residuals_one_number_or_one_each(unet):
    x, t, hint, context = inputs()
    net = randomised(ControlNet.from_unet(unet), 1)
    plain = residuals(net, x, t, hint, context)
    count = len(plain)
    scales = guess_mode_scales(count, 0.7)
    for got, one, want in zip(residuals(net, x, t, hint, context, scale=scales), plain, scales, strict=True):
        torch.testing.assert_close(got, one * want, rtol=1e-6, atol=1e-6)
    halved = residuals(net, x, t, hint, context, scale=0.5)
    assert all(torch.allclose(h, p * 0.5, rtol=1e-6, atol=1e-6) for h, p in zip(halved, plain, strict=True))


def test_guess_mode_scales_rise_log_spaced_from_a_tenth_to_the_scale():
    scales = guess_mode_scales(13, 0.8)
    assert len(scales) == 13 and scales[0] == pytest.approx(0.08) and scales[-1] == pytest.approx(0.8)
    ratios = [b / a for a, b in zip(scales, scales[1:])]
    assert all(r == pytest.approx(10 ** (1 / 12)) for r in ratios)


def test_the_hint_factor_follows_the_autoencoder():
    cfg = ControlNetConfig.of_unet(tiny_unet_config(), downsample_factor=4)
    assert cfg.hint_factor == 4 and cfg.conditioning_channels == (32, 96, 256)
    with pytest.raises(ValueError, match="downsample_factor = 6: expected a power of 2"):
        ControlNetConfig.of_unet(tiny_unet_config(), downsample_factor=6)


@pytest.mark.parametrize("change,message", [
    (dict(hint=torch.rand(2, 3, 32, 32)), r"hint: expected a control image of shape \(2, 3, 64, 64\) "
                                          r"\(latents \(8, 8\) × 8\), got \(2, 3, 32, 32\)"),
    (dict(hint=torch.rand(2, 1, 64, 64)), r"hint: expected a control image of shape \(2, 3, 64, 64\)"),
    (dict(x=torch.randn(2, 9, 8, 8)), r"expected x of shape \(B, 4, h, w\) \(the latents alone"),
    (dict(context=torch.randn(2, 5, 16)), r"expected context tokens of shape \(2, L, 8\)"),
    (dict(t=torch.tensor([3.0])), r"expected timesteps of shape \(2,\)"),
    (dict(scale=[1.0, 0.5]), r"scale: expected one number or 7 \(one per input block and the middle block\)"),
])
def test_inputs_that_do_not_fit_are_clear_errors(unet, change, message):
    x, t, hint, context = inputs()
    args = {**dict(x=x, t=t, hint=hint, context=context, scale=1.0), **change}
    with pytest.raises(ValueError, match=message):
        ControlNet.from_unet(unet)(**args)
