"""The networks' inference layers (`inference/layers.py`): swapped in by class with the same state dict, they give
the plain forward's outputs, and take their fast path only at eager CPU inference and where it pays."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion import unet
from latent_diffusion.autoencoder import AutoencoderKL, blocks
from latent_diffusion.inference import conv, layers, prepare_for_inference
from latent_diffusion.inference.layers import ChunkedFeedForward, MatmulConv2d, swap_inference_layers
from latent_diffusion.inference.precision import store_weights
from latent_diffusion.nn.attention import FeedForward
from latent_diffusion.unet import UNetModel

from conftest import randomised, tiny_autoencoder_config, tiny_unet_config

CPU = torch.device("cpu")


@pytest.fixture
def every_fast_path(monkeypatch):
    """The fast paths at tiny sizes, each counted: convolutions as matmuls, upsampling by phases, feed-forward
    in chunks."""
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(layers, "PHASES_MIN_PIXELS", 0)
    monkeypatch.setattr(ChunkedFeedForward, "CHUNK_TOKENS", 16)
    calls = {"matmul": 0, "phases": 0}
    for name, key in (("conv3x3_as_matmul", "matmul"), ("upsampled_conv3x3", "phases")):
        monkeypatch.setattr(conv, name, _counted(getattr(conv, name), calls, key))
    return calls


def _counted(fn, calls: dict, key: str):
    def counted(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return counted


def test_a_prepared_unet_gives_the_plain_outputs_and_keeps_its_state_dict(every_fast_path):
    cfg = tiny_unet_config(channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_res_blocks=2)
    plain = randomised(UNetModel(cfg), 0)
    prepared = prepare_for_inference(copy.deepcopy(plain), CPU)
    assert list(prepared.state_dict()) == list(plain.state_dict())
    assert {MatmulConv2d, layers.PhaseUpsample, ChunkedFeedForward} <= {type(m) for m in prepared.modules()}
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = plain(x, t, context)
        got = prepared(x, t, context)
    assert every_fast_path["matmul"] > 0 and every_fast_path["phases"] == 2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    calls = dict(every_fast_path)
    trained = prepared(x, t, context)  # with gradients: the plain forward
    assert every_fast_path == calls and torch.equal(trained.detach(), plain(x, t, context).detach())


def test_a_model_never_prepared_runs_its_plain_forward(every_fast_path):
    model = randomised(UNetModel(tiny_unet_config()), 0)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8))
    assert every_fast_path == {"matmul": 0, "phases": 0}
    assert not any(type(m) in layers.INFERENCE_CLASSES.values() for m in model.modules())


def test_a_prepared_decoder_upsamples_by_phases_to_the_plain_output(monkeypatch):
    model = randomised(AutoencoderKL(tiny_autoencoder_config(ch_mult=(1, 2, 2), resolution=40,
                                                             attn_resolutions=(20,))), 0)
    model = prepare_for_inference(model, CPU, row_bands=False)
    assert {type(level.upsample) for level in model.decoder.up[1:]} == {layers.PhaseDecoderUpsample}
    z = torch.randn(2, 4, 5, 7)
    expected = model.decode(z).detach()  # with gradients: the plain layers
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), expected, rtol=0, atol=0)  # 70 pixels: no phases
        monkeypatch.setattr(layers, "PHASES_MIN_PIXELS", 0)
        torch.testing.assert_close(model.decode(z), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape,bias", [((2, 6, 4, 5), True), ((1, 3, 1, 7), False)])
def test_convolutions_go_by_one_matmul_only_at_cpu_inference_with_few_pixels_and_large_weights(shape, bias,
                                                                                               monkeypatch):
    layer = swap_inference_layers(nn.Conv2d(shape[1], 7, 3, padding=1, bias=bias))
    x = torch.randn(shape)
    assert type(layer) is MatmulConv2d
    with torch.no_grad():
        assert not layer.as_matmul(x)  # small weights: oneDNN's kernels
        monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
        assert layer.as_matmul(x)
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), rtol=0, atol=1e-5)
        strided = swap_inference_layers(nn.Conv2d(shape[1], 7, 3, stride=2, padding=1, bias=bias))
        assert strided.as_matmul(x)  # the UNet's downsampling
        expected = F.conv2d(x, strided.weight, strided.bias, stride=2, padding=1)
        torch.testing.assert_close(strided(x), expected, rtol=0, atol=1e-5)
        assert not swap_inference_layers(nn.Conv2d(shape[1], 7, 3, stride=3, padding=1)).as_matmul(x)
        assert not swap_inference_layers(nn.Conv2d(shape[1], 7, 3)).as_matmul(x)  # unpadded
        traced = torch.jit.trace(layer, x)  # what OpenVINO converts: the plain convolution
        assert "aten::_convolution" in {node.kind() for node in traced.graph.nodes()}
        monkeypatch.setattr(conv, "MATMUL_MAX_PIXELS", x[:, 0].numel() - 1)
        assert not layer.as_matmul(x)  # too many pixels: oneDNN's kernels are faster
    monkeypatch.undo()
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
    assert not layer.as_matmul(x)  # gradients on: the plain convolution, for autograd


@pytest.mark.parametrize("plain_class", [unet.Upsample, blocks.Upsample])
def test_upsample_layers_take_the_phases_only_at_cpu_inference_from_enough_pixels(plain_class, monkeypatch):
    torch.manual_seed(0)
    layer, x = swap_inference_layers(randomised(plain_class(6), 0)), torch.randn(2, 6, 4, 5)
    assert isinstance(layer, plain_class) and type(layer) is not plain_class
    expected = layer.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")).detach()
    calls = {"phases": 0}
    monkeypatch.setattr(conv, "upsampled_conv3x3", _counted(conv.upsampled_conv3x3, calls, "phases"))
    with torch.no_grad():
        layer(x)
        assert calls["phases"] == 0  # 40 pixels, below PHASES_MIN_PIXELS: the weight transform would cost more
        monkeypatch.setattr(layers, "PHASES_MIN_PIXELS", 40)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        assert calls["phases"] == 1
        traced = torch.jit.trace(layer, x, check_trace=False)  # what OpenVINO converts: the plain layers
        assert "aten::upsample_nearest2d" in {node.kind() for node in traced.graph.nodes()}
    layer(x)  # with gradients
    assert calls["phases"] == 1
    store_weights(layer, torch.bfloat16, torch.float32)  # stored bf16, fp32 math: cast before `forward`
    with torch.no_grad():
        out = layer(x)
    assert calls["phases"] == 2 and out.dtype == torch.float32 and (out - expected).abs().max() < 0.05


def test_upsampling_to_a_size_other_than_double_or_through_a_hooked_conv_is_plain(monkeypatch):
    monkeypatch.setattr(layers, "PHASES_MIN_PIXELS", 0)
    layer, x = swap_inference_layers(randomised(unet.Upsample(6), 0)), torch.randn(1, 6, 4, 5)
    with torch.no_grad():
        assert layer.by_phases(x) and layer.by_phases(x, (8, 10))
        assert not layer.by_phases(x, (9, 10))  # a skip of odd size: interpolate to it, then convolve
        expected = layer.conv(F.interpolate(x, size=(9, 10), mode="nearest"))
        assert torch.equal(layer(x, (9, 10)), expected)
        layer.conv.register_forward_hook(lambda module, args, out: out + 1)  # e.g. a LoRA's
        assert not layer.by_phases(x)


def test_feed_forward_in_chunks_gives_the_whole_output_and_casts_stored_weights_once(monkeypatch):
    torch.manual_seed(0)
    ff = swap_inference_layers(FeedForward(16).eval())
    assert type(ff) is ChunkedFeedForward
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        whole = ff(x)
        chunks = []
        ff.net.register_forward_hook(lambda module, args, out: chunks.append(out.shape[0]))
        monkeypatch.setattr(ChunkedFeedForward, "CHUNK_TOKENS", 4)  # 22 tokens: chunks of 4, 4, …, 2
        assert torch.allclose(ff(x), whole, atol=1e-6) and chunks == [4, 4, 4, 4, 4, 2]
    store_weights(ff, torch.bfloat16, torch.float32)
    casts = []
    ff.register_forward_pre_hook(lambda module, args: casts.append(module.net[0].proj.weight.dtype))
    assert not ff.net[0].proj._forward_pre_hooks and not ff.net[2]._forward_pre_hooks  # cast with the block
    with torch.no_grad():
        out = ff(x)
    assert casts == [torch.float32] and out.dtype == torch.float32  # cast once, before the chunks
    assert (out - whole).abs().max() < 0.05 and {p.dtype for p in ff.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_on_amx_tiles_runs_channels_last_on_onednn_own_convolutions(every_fast_path, monkeypatch, amx):
    """Where bf16 runs on AMX tiles (the host rule, made to answer both ways here) the UNet is prepared
    channels-last, upsampling by phases steps aside for oneDNN's kernels and the convolutions of few pixels go by
    the channels-last matmul and the transformer blocks' feed-forward and residuals go into oneDNN's products;
    elsewhere NCHW with both paths. The same outputs within bf16's rounding either way."""
    from latent_diffusion.inference import memory
    from latent_diffusion.runtime import autocast
    monkeypatch.setattr(layers, "amx_bf16_tiles", lambda: amx)
    monkeypatch.setattr(memory, "amx_bf16_tiles", lambda: amx)
    every_fast_path["nhwc"] = every_fast_path["halves"] = 0
    monkeypatch.setattr(conv, "_nhwc_conv3x3_as_matmul",
                        _counted(conv._nhwc_conv3x3_as_matmul, every_fast_path, "nhwc"))
    monkeypatch.setattr(ChunkedFeedForward, "geglu_by_halves",
                        _counted(ChunkedFeedForward.geglu_by_halves, every_fast_path, "halves"))
    cfg = tiny_unet_config(channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_res_blocks=2)
    plain = randomised(UNetModel(cfg), 0)
    prepared = prepare_for_inference(copy.deepcopy(plain), CPU, torch.bfloat16, torch.bfloat16)
    assert prepared.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last) == amx
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = plain(x, t, context)
        with autocast(CPU, "bf16"):
            got = prepared(x, t, context).float()
    assert every_fast_path["matmul"] > 0 and (every_fast_path["nhwc"] > 0) == amx
    assert (every_fast_path["phases"] > 0) == (not amx)
    assert (every_fast_path["halves"] > 0) == (amx and layers.linear_pointwise_available())
    assert (got - expected).norm() < 2e-2 * expected.norm()


@pytest.mark.skipif(not layers.linear_pointwise_available(), reason="oneDNN has no bf16 products on this CPU")
def test_transformer_block_on_amx_tiles_adds_in_the_products_as_accurately_as_the_plain_block(monkeypatch):
    """Where bf16 products run on AMX tiles (the rule made to answer yes here) a prepared transformer block runs
    the GEGLU by halves and adds its three residuals inside the products before them: no further from the fp32
    block than the plain block in bf16 is. A hook on a layer it would call past (a LoRA's) sends it the plain way,
    hook included; so do fp32 and gradients."""
    from latent_diffusion.nn.attention import BasicTransformerBlock
    monkeypatch.setattr(layers, "amx_bf16_tiles", lambda: True)
    calls = {"halves": 0, "add": 0, "mul": 0}
    monkeypatch.setattr(ChunkedFeedForward, "geglu_by_halves",
                        _counted(ChunkedFeedForward.geglu_by_halves, calls, "halves"))
    then = layers.onednn_linear_then
    monkeypatch.setattr(layers, "onednn_linear_then", lambda *args: calls.update({args[3]: calls[args[3]] + 1})
                        or then(*args))
    monkeypatch.setattr(ChunkedFeedForward, "AMX_CHUNK_TOKENS", 16)  # 2 × 23 tokens: chunks of 16, 16, 14
    torch.manual_seed(0)
    reference = randomised(BasicTransformerBlock(64, 4, 16, context_dim=32), 0).eval()
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    block = swap_inference_layers(copy.deepcopy(plain))
    assert type(block) is layers.ResidualFusedTransformerBlock and type(block.ff) is ChunkedFeedForward
    x, context = torch.randn(2, 23, 64), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = reference(x, context)
        plain_error = (plain(x.bfloat16(), context.bfloat16()).float() - expected).norm()
        got = block(x.bfloat16(), context.bfloat16())
    assert calls == {"halves": 1, "add": 2 + 3, "mul": 3}  # the attentions' two, the feed-forward's three chunks
    assert got.dtype == torch.bfloat16 and (got.float() - expected).norm() <= 1.5 * plain_error + 1e-3

    hook = block.attn2.to_out[0].register_forward_hook(lambda module, args, out: out + 1)  # e.g. a LoRA's
    with torch.no_grad():
        hooked = block(x.bfloat16(), context.bfloat16()).float()
        assert calls["add"] == 5 and calls["halves"] == 2  # the block the plain way, its feed-forward by halves
        assert (hooked - got.float() - 1).abs().max() < 0.1
        hook.remove()
        block.float()(x, context)  # fp32: the plain forward throughout
    assert calls["halves"] == 2
    trained = block(x, context)  # with gradients: the plain forward
    assert calls["halves"] == 2 and torch.allclose(trained, plain.float()(x, context), atol=1e-5)
