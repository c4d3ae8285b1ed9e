"""The `Conditioning` batch: tokens and their mask, concatenated across prompts of different lengths."""

import torch

from latent_diffusion.conditioning import Conditioning


def test_conditioning_cat_pads_shorter_sequences():
    a = Conditioning(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    b = Conditioning(torch.ones(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
    both = Conditioning.cat([a, b])
    assert both.tokens.shape == (3, 5, 4) and both.mask.sum(1).tolist() == [2, 5, 5]
    assert (both.tokens[0, 2:] == 0).all()
