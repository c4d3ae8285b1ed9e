"""The diffusion transformer backbone: DiT's adaLN-Zero start, patches in and out at any latent size, the
condition tokens reaching the output, checkpointing and the inference layers changing nothing, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomised
from latent_diffusion.config import DiTConfig
from latent_diffusion.dit import DiT
from latent_diffusion.inference import prepare_for_inference

CFG = DiTConfig(in_channels=4, out_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, context_dim=8)


def _inputs(h=8, w=12, b=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 4, h, w, generator=g), torch.tensor([3.0, 700.0])[:b],
            torch.randn(b, 5, 8, generator=g))


def test_adaln_zero_starts_as_zero_output_and_every_block_as_the_identity():
    model = DiT(CFG).eval()
    x, t, context = _inputs()
    assert torch.equal(model(x, t, context), torch.zeros_like(x))
    tokens = torch.randn(2, 24, 32)
    for block in model.blocks:  # gates zero: only the (ungated) cross-attention adds to the tokens
        block.cross_attn.to_out[0].weight.data.zero_()
        block.cross_attn.to_out[0].bias.data.zero_()
        assert torch.equal(block(tokens, torch.randn(2, 32), context, None), tokens)


def test_patches_go_back_to_their_places_at_any_size():
    """With an embedding that keeps each patch's 16 values and a last layer that inverts it (the block being the
    identity at its adaLN-Zero start), the output is the input plus the fixed position codes, at any size."""
    model = DiT(DiTConfig(in_channels=4, out_channels=4, patch_size=2, hidden_size=16, depth=1, num_heads=1,
                          context_dim=None)).eval()
    with torch.no_grad():
        model.x_embedder.proj.weight.copy_(torch.eye(16).reshape(16, 4, 2, 2))  # token j = pixel (c, i, k)
        model.x_embedder.proj.bias.zero_()
        model.final_layer.norm_final = torch.nn.Identity()
        # the output's patch layout is (i, k, c): row (i, k, c) reads token entry (c, i, k)
        model.final_layer.linear.weight.copy_(torch.eye(16).reshape(4, 2, 2, 16).permute(1, 2, 0, 3).reshape(16, 16))
    for h, w in ((4, 4), (6, 10)):
        x, t = torch.randn(1, 4, h, w), torch.tensor([1.0])
        assert torch.allclose(model(x, t) - model(torch.zeros_like(x), t), x, atol=1e-5)


def test_the_condition_tokens_and_the_mask_reach_the_output():
    model = randomised(DiT(CFG), seed=1)
    x, t, context = _inputs()
    out = model(x, t, context)
    assert not torch.allclose(out, model(x, t, context.flip(1) * 2))
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    changed = context.clone()
    changed[:, 3:] = 100.0  # masked tokens are ignored
    assert torch.allclose(model(x, t, context, mask), model(x, t, changed, mask), atol=1e-5)
    assert not torch.allclose(model(x, t, context), model(x, t.flip(0), context))


def test_checkpointing_and_the_inference_layers_change_nothing():
    model = randomised(DiT(CFG), seed=2)
    x, t, context = _inputs()
    checkpointed = copy.deepcopy(model).train()
    checkpointed.config = DiTConfig(**{**CFG.__dict__, "gradient_checkpointing": True})
    plain = copy.deepcopy(model).train()
    a, b = plain(x, t, context), checkpointed(x, t, context)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(a, b) and torch.allclose(plain.blocks[0].attn.qkv.weight.grad,
                                                   checkpointed.blocks[0].attn.qkv.weight.grad, atol=1e-6)
    with torch.no_grad():
        expected = model.eval()(x, t, context)
        fast = prepare_for_inference(copy.deepcopy(model), torch.device("cpu"))(x, t, context)
    assert torch.allclose(expected, fast, atol=1e-5)


def test_inputs_that_do_not_fit_are_clear_errors():
    model = DiT(CFG)
    x, t, context = _inputs()
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model(torch.randn(2, 4, 7, 8), t, context)
    with pytest.raises(ValueError, match=r"context tokens of shape \(2, L, 8\)"):
        model(x, t, None)
    with pytest.raises(ValueError, match="takes no control residuals"):
        model(x, t, context, vector=torch.zeros(2, 3))
