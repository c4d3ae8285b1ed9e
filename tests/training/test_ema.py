"""The exponential moving average of the weights: the update, and the warm-up of its decay."""

import pytest
import torch

from latent_diffusion.training.ema import EMA


def test_ema_update_and_warmup():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 1 - 0.9 ** 2))
    assert EMA(model, decay=0.9999).current_decay() == pytest.approx(0.1)
