"""SD3's MMDiT: equal to diffusers' SD3Transformer2DModel (SD3, SD3.5's q/k norms, MMDiT-X's second attention) on
tiny random weights through the key map both ways; masked condition tokens, checkpointing and the inference
layers; clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomised
from latent_diffusion.config import ConfigError, MMDiTConfig
from latent_diffusion.formats.sd3 import (mmdit_config_from_diffusers, mmdit_config_to_diffusers,
                                          mmdit_state_from_diffusers, mmdit_state_to_diffusers)
from latent_diffusion.inference import prepare_for_inference
from latent_diffusion.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")

CFG = MMDiTConfig(in_channels=4, out_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=4, context_dim=24,
                  adm_in_channels=12, pos_embed_max_size=8)


def _inputs(cfg=CFG, h=8, w=12, b=2, length=5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, cfg.in_channels, h, w, generator=g), torch.tensor([3.0, 700.5])[:b],
            torch.randn(b, length, cfg.context_dim, generator=g), torch.randn(b, cfg.adm_in_channels, generator=g))


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"qk_norm": True, "dual_attention_layers": (0, 1)}],
                         ids=["sd3", "qk-norm", "mmdit-x"])
def test_the_mmdit_equals_diffusers_sd3_transformer_both_ways(variant):
    cfg = MMDiTConfig(**{**CFG.__dict__, **variant})
    theirs = randomised(diffusers.SD3Transformer2DModel(**{k: v for k, v in mmdit_config_to_diffusers(cfg, 4).items()
                                                           if not k.startswith("_")}), seed=1).eval()
    assert mmdit_config_from_diffusers(dict(theirs.config)) == (cfg, 4)
    ours = MMDiT(cfg).eval()
    ours.load_state_dict(mmdit_state_from_diffusers(cfg, theirs.state_dict()))
    back = mmdit_state_to_diffusers(cfg, ours.state_dict())
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    x, t, context, vector = _inputs(cfg)
    with torch.no_grad():
        expected = theirs(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=vector).sample
        got = ours(x, t, context, vector=vector)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().mean() > 0.1


def test_a_new_mmdit_starts_at_zero_and_reads_the_centre_of_its_position_grid():
    model = MMDiT(CFG).eval()
    x, t, context, vector = _inputs()
    assert torch.equal(model(x, t, context, vector=vector), torch.zeros_like(x))  # adaLN-Zero and a zero last layer
    grid = model.pos_embed.reshape(8, 8, -1)
    assert torch.equal(model.positions(4, 6), grid[2:6, 1:7].reshape(24, -1))


def test_masked_condition_tokens_change_nothing():
    model = randomised(MMDiT(CFG), seed=2).eval()
    x, t, context, vector = _inputs(length=5)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        masked = model(x, t, context, mask, vector=vector)
        short = model(x[:1], t[:1], context[:1, :3], vector=vector[:1])
        unmasked = model(x, t, context, vector=vector)
    torch.testing.assert_close(masked[:1], short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[1:], unmasked[1:])
    assert not torch.allclose(masked[:1], unmasked[:1], atol=1e-4)


def test_gradient_checkpointing_and_the_inference_layers_change_nothing():
    model = randomised(MMDiT(CFG), seed=3)
    x, t, context, vector = _inputs()
    plain = model(x, t, context, vector=vector)
    plain.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    checkpointed = copy.deepcopy(model)
    checkpointed.config = MMDiTConfig(**{**CFG.__dict__, "gradient_checkpointing": True})
    checkpointed.zero_grad()
    again = checkpointed(x, t, context, vector=vector)
    again.square().mean().backward()
    assert torch.equal(again, plain)
    assert all(torch.allclose(p.grad, grads[k], atol=1e-6) for k, p in checkpointed.named_parameters())
    prepared = prepare_for_inference(copy.deepcopy(model).eval(), torch.device("cpu"), torch.float32, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x, t, context, vector=vector), model.eval()(x, t, context, vector=vector))


def test_inputs_the_mmdit_cannot_take_are_refused_clearly():
    model = MMDiT(CFG).eval()
    x, t, context, vector = _inputs()
    with pytest.raises(ValueError, match=r"a latent of 18×12 is 9×6 patches: this MMDiT knows positions up to 8"):
        model(torch.zeros(2, 4, 18, 12), t, context, vector=vector)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, h, w\) with h and w multiples of the patch"):
        model(torch.zeros(2, 4, 7, 12), t, context, vector=vector)
    with pytest.raises(ValueError, match=r"expected context tokens of shape \(2, L, 24\)"):
        model(x, t, context[..., :8], vector=vector)
    with pytest.raises(ValueError, match=r"expected a vector condition of shape \(2, 12\)"):
        model(x, t, context)
    with pytest.raises(ValueError, match="an MMDiT backbone takes no control residuals"):
        model(x, t, context, class_labels=torch.zeros(2, dtype=torch.long), vector=vector)
    with pytest.raises(ConfigError, match="mmdit.dual_attention_layers = \\(3,\\): expected block indices below"):
        MMDiTConfig(depth=3, dual_attention_layers=(3,))
