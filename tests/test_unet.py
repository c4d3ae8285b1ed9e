"""The denoising UNet: shapes, masks, Stable Diffusion layouts, and parity with diffusers' UNet2DConditionModel."""

import pytest
import torch

from latent_diffusion.config import ConfigError, UNetConfig
from latent_diffusion.formats.keymaps import unet_to_diffusers
from latent_diffusion.inference import conv, layers, prepare_for_inference
from latent_diffusion.inference.layers import ChunkedFeedForward
from latent_diffusion.nn.attention import BasicTransformerBlock, KVStream
from latent_diffusion.unet import Residuals, UNetModel

from conftest import tiny_unet_config


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
    with pytest.raises(ValueError, match=r"context tokens of shape \(1, L, 8\), got \(1, 2, 7\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match=r"context tokens of shape \(1, L, 8\), got \(2, 2, 8\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(2, 2, 8))  # one batch for x and context
    with pytest.raises(ValueError, match=r"timesteps of shape \(2,\), got \(1,\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1.0]), torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match=r"context_mask of shape \(2, 5\) \(B, L\), got \(2, 4\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 8),
              torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="class_labels are required exactly when the network.s num_classes is set"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 8), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"class_labels of shape \(2,\), got \(4,\)"):
        UNetModel(tiny_unet_config(num_classes=3, context_dim=None))(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]),
                                                                    class_labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ConfigError, match="multiple of norm_groups"):
        tiny_unet_config(model_channels=12)


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


def _ours_and_diffusers(linear: bool = False):
    """A random tiny three-level UNet of ours and the same weights in diffusers' UNet2DConditionModel."""
    diffusers = pytest.importorskip("diffusers")
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
    return ours, theirs


@pytest.mark.parametrize("linear,prepared", [(False, False), (True, False), (False, True)])
def test_parity_with_diffusers_unet(linear, prepared, monkeypatch):
    ours, theirs = _ours_and_diffusers(linear)
    if prepared:  # the CPU inference paths at tiny sizes: convolutions as matmuls, feed-forward in chunks,
        monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)  # upsampling convolutions by phases
        monkeypatch.setattr(layers, "PHASES_MIN_PIXELS", 0)
        monkeypatch.setattr(ChunkedFeedForward, "CHUNK_TOKENS", 16)
        ours = prepare_for_inference(ours, torch.device("cpu"))
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

    from conftest import TINY_SD1, tiny_original_parts

    parts = tiny_original_parts(TINY_SD1, position_embedding=True)
    with pytest.raises(ConfigError, match="position_embedding = True: the original format has no such option"):
        save_model(parts, tmp_path / "x.safetensors", "original")


# --- extension points: control residuals (ControlNet, T2I-Adapter), extra key/value streams (IP-Adapter) --------

def _block_outputs(unet: UNetModel, *inputs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs of the UNet's input blocks and of its middle block for `inputs`."""
    outputs = []
    hooks = [block.register_forward_hook(lambda _, __, out: outputs.append(out))
             for block in [*unet.input_blocks, unet.middle_block]]
    with torch.no_grad():
        unet(*inputs)
    for hook in hooks:
        hook.remove()
    return outputs[:-1], outputs[-1]


def test_controlnet_residuals_match_diffusers():
    ours, theirs = _ours_and_diffusers()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8)
    skips, middle = _block_outputs(ours, x, t, context)
    skips, middle = [torch.randn_like(s) for s in skips], torch.randn_like(middle)
    with torch.no_grad():
        plain = ours(x, t, context)
        got = ours(x, t, context, residuals=Residuals(skips=skips, middle=middle))
        expected = theirs(x, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(skips),
                          mid_block_additional_residual=middle).sample
    assert (got - plain).abs().max() > 1e-2
    assert (got - expected).abs().max().item() < 1e-4


def test_t2i_adapter_features_join_the_hidden_state_after_their_block():
    unet = _randomise(UNetModel(tiny_unet_config(num_res_blocks=2))).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8)
    outputs, _ = _block_outputs(unet, x, t, context)
    features = {2: torch.randn_like(outputs[2]), 4: torch.randn_like(outputs[4])}
    hooks = [unet.input_blocks[i].register_forward_hook(lambda _, __, out, f=f: out + f) for i, f in features.items()]
    with torch.no_grad():
        expected = unet(x, t, context)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        got = unet(x, t, context, residuals=Residuals(inputs=features))
    assert torch.equal(got, expected)


def test_residuals_that_do_not_fit_are_named():
    unet = UNetModel(tiny_unet_config()).eval()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([3.0]), torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match=r"residuals.skips: expected one per input block \(4\), got 2"):
        unet(x, t, context, residuals=Residuals(skips=[x, x]))
    with pytest.raises(ValueError, match=r"residuals.inputs: block indices \[7\] outside 0..3"):
        unet(x, t, context, residuals=Residuals(inputs={7: x}))


def test_extra_streams_reach_every_cross_attention_and_only_add_their_own_weights():
    unet = _randomise(UNetModel(tiny_unet_config())).eval()
    keys = set(unet.state_dict())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 8)
    image = torch.randn(2, 4, 6)  # another encoder's tokens, of another width
    with torch.no_grad():
        plain = unet(x, t, context)
    layers = [m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    calls = []
    for attn in layers:
        attn.streams["image"] = KVStream(6, attn.to_k.out_features)
        attn.streams["image"].to_k.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), plain)  # no image tokens in this call: nothing added
        changed = unet(x, t, context, extra_context={"image": image})
    assert len(calls) == len(layers) > 0 and (changed - plain).abs().max() > 1e-3
    added = set(unet.state_dict()) - keys
    assert added and all(".attn2.streams.image.to_" in key for key in added)
