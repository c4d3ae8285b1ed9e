"""Condition dropout for classifier-free guidance training: the mask training draws, and ∅ put in its place."""

import pytest
import torch

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.dropout import drop_condition, drop_mask


def test_drop_mask_drops_each_sample_with_probability_p_uncond():
    drop = drop_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert drop.dtype == torch.bool and drop.shape == (20000,)
    assert abs(drop.float().mean().item() - 0.1) < 0.01
    assert not drop_mask(100, 0.0).any() and drop_mask(100, 1.0).all()


def test_drop_mask_takes_one_uniform_draw_per_sample_from_the_generator():
    """Resumed training restores the generator: the mask, and every draw after it, must depend on it alone."""
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(drop_mask(64, 0.3, a), drop_mask(64, 0.3, b))
    b.manual_seed(5)
    torch.rand(64, generator=b)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_drop_mask_rejects_a_probability_outside_0_1():
    with pytest.raises(ValueError, match=r"p_uncond must be in \[0, 1\], got 1.5"):
        drop_mask(4, 1.5)


def test_drop_condition_puts_the_null_condition_where_dropped():
    cond = Conditioning(torch.ones(4, 3, 2), torch.ones(4, 3, dtype=torch.bool))
    null = Conditioning(torch.full((1, 2, 2), -1.0), torch.ones(1, 2, dtype=torch.bool))
    drop = torch.tensor([True, False, False, True])
    dropped = drop_condition(cond, null, drop)
    assert (dropped.tokens[drop, :2] == -1).all() and (dropped.tokens[drop, 2] == 0).all()
    assert dropped.mask[drop].tolist() == [[True, True, False]] * 2  # ∅ is shorter: padded, masked out
    assert (dropped.tokens[~drop] == 1).all() and dropped.mask[~drop].all()
