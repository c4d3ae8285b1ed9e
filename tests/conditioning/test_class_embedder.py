"""Class labels as one learned token each, with a learned null label for guidance."""

import pytest
import torch

from latent_diffusion.conditioning import build_encoder


def test_class_embedder_gives_one_token_per_label_and_a_learned_null_label():
    embedder = build_encoder("class", num_classes=10, dim=8)
    cond = embedder(torch.tensor([0, 3, 9]))
    assert cond.tokens.shape == (3, 1, 8) and cond.mask.shape == (3, 1) and cond.mask.all()
    uncond = embedder.unconditional(2)
    assert torch.equal(uncond.tokens[0, 0], embedder.embedding.weight[10]) and uncond.tokens.requires_grad
    with pytest.raises(ValueError, match="null label"):
        embedder([11])
