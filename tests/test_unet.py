"""The denoising UNet: shapes, masks, Stable Diffusion layouts, and parity with diffusers' UNet2DConditionModel."""

import pytest
import torch
import torch.nn.functional as F

from latent_diffusion.config import ConfigError, UNetConfig
from latent_diffusion.formats.keymaps import unet_to_diffusers
from latent_diffusion.inference import conv
from latent_diffusion.inference.conv import phases_as_matmuls
from latent_diffusion.nn.attention import FeedForward
from latent_diffusion.runtime import store_weights
from latent_diffusion import unet as unet_module
from latent_diffusion.unet import UNetModel, Upsample


def tiny_unet_config(**kw) -> UNetConfig:
    base = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(2,), num_heads=2, context_dim=8, norm_groups=8)
    base.update(kw)
    return UNetConfig(**base)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would hide errors)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("cfg_kw,shape", [
    ({}, (2, 4, 8, 8)),
    ({"channel_mult": (1, 2, 2), "attention_resolutions": (1, 4)}, (1, 4, 8, 12)),  # non-square
    ({"num_head_channels": 8, "use_linear_in_transformer": True, "transformer_depth": 2}, (2, 4, 16, 8)),
    ({"channel_mult": (1, 2, 2)}, (1, 4, 6, 10)),  # not divisible by 4: upsampling follows the skips' sizes
])
def test_output_shape_matches_input(cfg_kw, shape):
    model = UNetModel(tiny_unet_config(**cfg_kw))
    x = torch.randn(shape)
    out = model(x, torch.tensor([10.0] * shape[0]), torch.randn(shape[0], 5, 8))
    assert out.shape == x.shape


def test_class_conditioning_and_concat_channels():
    model = _randomise(UNetModel(tiny_unet_config(in_channels=6, concat_channels=2, num_classes=3, context_dim=None)))
    x, t = torch.randn(2, 6, 8, 8), torch.tensor([5.0, 500.0])
    a = model(x, t, class_labels=torch.tensor([0, 1]))
    b = model(x, t, class_labels=torch.tensor([2, 1]))
    assert a.shape == (2, 4, 8, 8)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def test_cross_attention_ignores_masked_tokens():
    model = _randomise(UNetModel(tiny_unet_config())).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([100.0])
    context = torch.randn(1, 3, 8)
    padded = torch.cat([context, torch.randn(1, 4, 8) * 10], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    with torch.no_grad():
        short = model(x, t, context)
        masked = model(x, t, padded, context_mask=mask)
        unmasked = model(x, t, padded)
    assert torch.allclose(short, masked, atol=1e-5)
    assert not torch.allclose(short, unmasked, atol=1e-3)


def test_bad_inputs_are_clear_errors():
    model = UNetModel(tiny_unet_config())
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, h, w\)"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match=r"context tokens of shape \(B, L, 8\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match=r"context with a batch size equal to x's \(2\) or a multiple of it"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match=r"context_mask of shape \(2, 5\) \(B, L\), got \(2, 4\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="multiple of norm_groups"):
        tiny_unet_config(model_channels=12)


@pytest.mark.parametrize("cfg_kw,repeats", [
    ({}, 2),
    ({"attention_resolutions": (1, 2), "use_linear_in_transformer": True, "transformer_depth": 2}, 3),
    ({"attention_resolutions": ()}, 2),  # no cross-attention: the latents meet their conditions at the output
])
def test_latents_shared_by_several_conditions_run_once_up_to_the_first_cross_attention(cfg_kw, repeats):
    """x and t once for r conditions (CFG's ∅ and y) = x and t repeated r times; the first ResBlock runs on B."""
    model = _randomise(UNetModel(tiny_unet_config(**cfg_kw))).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 600.0])
    context = torch.randn(2 * repeats, 5, 8)
    mask = torch.rand(2 * repeats, 5) < 0.7
    mask[:, 0] = True
    batches = []
    model.input_blocks[1][0].register_forward_hook(lambda module, args, out: batches.append(out.shape[0]))
    with torch.no_grad():
        shared = model(x, t, context, mask)
        repeated = model(x.repeat(repeats, 1, 1, 1), t.repeat(repeats), context, mask)
    assert batches == [2, 2 * repeats]
    assert shared.shape == repeated.shape == (2 * repeats, 4, 8, 8)
    assert torch.allclose(shared, repeated, atol=1e-5)
    assert not torch.allclose(shared[:2], shared[2:4], atol=1e-3)  # the conditions do tell the outputs apart


def test_shared_latents_with_class_labels_join_them_at_once():
    model = _randomise(UNetModel(tiny_unet_config(num_classes=3, context_dim=None))).eval()
    x, t, labels = torch.randn(1, 4, 8, 8), torch.tensor([50.0]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.allclose(model(x, t, class_labels=labels), model(x.repeat(2, 1, 1, 1), t.repeat(2),
                                                                          class_labels=labels), atol=1e-6)


def test_stable_diffusion_layouts():
    """SD 1.x and 2.x configs have the real `model.diffusion_model.*` key counts and parameter counts."""
    sd1 = UNetConfig()
    sd2 = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
    for cfg, params in ((sd1, 859_520_964), (sd2, 865_910_724)):
        with torch.device("meta"):
            state = UNetModel(cfg).state_dict()
        assert len(state) == 686
        assert sum(v.numel() for v in state.values()) == params
    with torch.device("meta"):
        state = UNetModel(sd1).state_dict()
    assert tuple(state["input_blocks.1.1.proj_in.weight"].shape) == (320, 320, 1, 1)
    assert tuple(state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 768)
    assert tuple(state["middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"].shape) == (10240, 1280)
    assert tuple(state["output_blocks.2.1.conv.weight"].shape) == (1280, 1280, 3, 3)
    assert tuple(state["output_blocks.5.2.conv.weight"].shape) == (1280, 1280, 3, 3)
    assert tuple(state["out.2.weight"].shape) == (4, 320, 3, 3)


@pytest.mark.parametrize("linear,inference_paths", [(False, False), (True, False), (False, True)])
def test_parity_with_diffusers_unet(linear, inference_paths, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    if inference_paths:  # the CPU inference paths at tiny sizes: convolutions as matmuls, feed-forward in chunks,
        monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)  # upsampling convolutions by phases
        monkeypatch.setattr(conv, "PHASES_MIN_PIXELS", 0)
        monkeypatch.setattr(FeedForward, "CHUNK_TOKENS", 16)
    cfg = tiny_unet_config(channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_res_blocks=2,
                           use_linear_in_transformer=linear, transformer_depth=1 + linear)
    ours = _randomise(UNetModel(cfg)).eval()
    theirs = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=8, use_linear_projection=linear,
        transformer_layers_per_block=1 + linear).eval()
    mapping = unet_to_diffusers(cfg, list(ours.state_dict()))
    converted = {mapping[k]: v for k, v in ours.state_dict().items()}
    assert set(converted) == set(theirs.state_dict())
    theirs.load_state_dict(converted)
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert (got - expected).abs().max().item() < 1e-4


def test_position_embedding_adds_no_parameters_and_tells_places_apart():
    from latent_diffusion.nn.embeddings import grid_position_embedding

    codes = grid_position_embedding(4, 6, 16)
    assert codes.shape == (24, 16) and torch.unique(codes, dim=0).shape[0] == 24  # every cell its own code
    plain, positional = tiny_unet_config(), tiny_unet_config(position_embedding=True)
    torch.manual_seed(0)
    a = _randomise(UNetModel(plain)).eval()
    b = UNetModel(positional).eval()
    b.load_state_dict(a.state_dict())  # the same parameters: the codes are fixed
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, plain.context_dim)
    assert not torch.allclose(a(x, t, context=context), b(x, t, context=context))


def test_position_embedding_models_stay_native(tmp_path):
    from latent_diffusion.config import ConfigError
    from latent_diffusion.formats.model import save_model

    from test_interop_original import TINY_SD1, tiny_parts

    parts = tiny_parts(TINY_SD1, position_embedding=True)
    with pytest.raises(ConfigError, match="position_embedding = True: the original format has no such option"):
        save_model(parts, tmp_path / "x.safetensors", "original")


@pytest.mark.parametrize("shape,bias", [((2, 6, 4, 5), True), ((1, 3, 1, 7), False), ((3, 5, 6, 6), True)])
def test_convolution_as_one_matmul_equals_the_direct_one(shape, bias, monkeypatch):
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
    layer = conv.Conv2d(shape[1], 7, 3, padding=1, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        assert layer._as_matmul(x)
        got = layer(x)
    assert got.shape == (shape[0], 7, *shape[2:]) and got.is_contiguous()
    assert torch.allclose(got, torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-5)
    assert not layer._as_matmul(x)  # gradients on: the plain convolution, for autograd
    with torch.no_grad():
        strided = conv.Conv2d(shape[1], 7, 3, stride=2, padding=1, bias=bias)
        assert strided._as_matmul(x)  # the UNet's downsampling
        expected = torch.nn.functional.conv2d(x, strided.weight, strided.bias, stride=2, padding=1)
        got = strided(x)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
        assert not conv.Conv2d(shape[1], 7, 3, stride=3, padding=1)._as_matmul(x)
        assert not conv.Conv2d(6, 7, 3)._as_matmul(x)  # unpadded
        traced = torch.jit.trace(layer, x)  # what OpenVINO converts: the plain convolution
        assert "aten::_convolution" in {node.kind() for node in traced.graph.nodes()}
        monkeypatch.setattr(conv, "MATMUL_MAX_PIXELS", x[:, 0].numel() - 1)
        assert not layer._as_matmul(x)  # too many pixels: oneDNN's kernels are faster


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsampled_convolution_equals_upsampling_then_convolving(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
    weight, bias = torch.randn(4, 6, 3, 3), torch.randn(4)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    got = conv.upsampled_conv3x3(x, weight, bias)
    assert got.shape == (2, 4, 10, 14) and got.is_contiguous(memory_format=layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(conv.upsampled_conv3x3(x, weight, None), expected - bias[:, None, None], rtol=0,
                               atol=2e-5)
    # bands of input rows [r0, r1), read with a row of halo where they do not touch the border, written in bf16
    out = torch.empty(2, 4, 10, 14, dtype=torch.bfloat16)
    for r0, r1 in [(0, 1), (1, 3), (3, 4), (4, 5)]:
        band = x[:, :, max(r0 - 1, 0):r1 + 1]
        conv.upsampled_conv3x3(band, weight, bias, padding=(int(r0 == 0), int(r1 == 5)), out=out[:, :, 2 * r0:2 * r1])
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsampled_convolution_of_few_pixels_as_matmuls_equals_upsampling_then_convolving(layout, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
    weight, bias = torch.randn(4, 6, 3, 3), torch.randn(4)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    calls = []
    monkeypatch.setattr(conv, "phases_as_matmuls", lambda *a: calls.append(1) or phases_as_matmuls(*a))
    conv.upsampled_conv3x3(x, weight, bias)
    assert not calls  # small weights: one convolution by oneDNN
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
    torch.testing.assert_close(conv.upsampled_conv3x3(x, weight, bias), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(conv.upsampled_conv3x3(x, weight, None), expected - bias[:, None, None], rtol=0,
                               atol=2e-5)
    assert len(calls) == 2
    monkeypatch.setattr(conv, "MATMUL_MAX_PIXELS", x[:, 0].numel() - 1)
    conv.upsampled_conv3x3(x, weight, bias)
    assert len(calls) == 2  # too many pixels


def test_upsample_layers_take_the_phases_only_at_cpu_inference_from_enough_pixels(monkeypatch):
    torch.manual_seed(0)
    layer, x = _randomise(Upsample(6)).eval(), torch.randn(2, 6, 4, 5)
    expected = layer.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")).detach()
    calls = []
    monkeypatch.setattr(unet_module, "upsampled_conv3x3",
                        lambda *a, **k: calls.append(1) or conv.upsampled_conv3x3(*a, **k))
    with torch.no_grad():
        layer(x)
        assert not calls  # 40 pixels, below PHASES_MIN_PIXELS: the weight transform would cost more
        monkeypatch.setattr(conv, "PHASES_MIN_PIXELS", 40)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        assert len(calls) == 1
        layer(x, size=(9, 10))  # not ×2: interpolate, then convolve
        traced = torch.jit.trace(layer, x, check_trace=False)  # what OpenVINO converts: the plain layers
        assert "aten::upsample_nearest2d" in {node.kind() for node in traced.graph.nodes()}
    layer(x)  # with gradients
    assert len(calls) == 1
    store_weights(layer, torch.bfloat16, torch.float32)  # stored bf16, fp32 math: cast before `forward`
    with torch.no_grad():
        out = layer(x)
    assert len(calls) == 2 and out.dtype == torch.float32 and (out - expected).abs().max() < 0.05


def test_feed_forward_in_chunks_gives_the_whole_output_and_casts_stored_weights_once(monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(16).eval()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        whole = ff(x)
        monkeypatch.setattr(FeedForward, "CHUNK_TOKENS", 4)  # 22 tokens: chunks of 4, 4, …, 2
        assert torch.allclose(ff(x), whole, atol=1e-6)
    store_weights(ff, torch.bfloat16, torch.float32)
    casts = []
    ff.register_forward_pre_hook(lambda module, args: casts.append(module.net[0].proj.weight.dtype))
    assert not ff.net[0].proj._forward_pre_hooks and not ff.net[2]._forward_pre_hooks  # cast with the block
    with torch.no_grad():
        out = ff(x)
    assert casts == [torch.float32] and out.dtype == torch.float32  # cast once, before the chunks
    assert (out - whole).abs().max() < 0.05 and {p.dtype for p in ff.parameters()} == {torch.bfloat16}
