"""Training state: optimizer, RNG and step restored exactly; a torn last checkpoint keeps the readable previous one."""

import os

import pytest
import torch

from latent_diffusion.files import atomic
from latent_diffusion.files.weights import is_complete_safetensors
from latent_diffusion.training.state import load_training_state, previous_path, save_training_state


def test_training_state_round_trip_restores_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    save_training_state(tmp_path / "s.safetensors", {"m": model}, {"o": opt}, step=3, extra={"epoch": 1})
    expected_noise = torch.randn(4)

    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2, betas=(0.5, 0.9))
    meta = load_training_state(tmp_path / "s.safetensors", {"m": model2}, {"o": opt2})
    assert meta == {"step": 3, "extra": {"epoch": 1}}
    assert torch.equal(torch.randn(4), expected_noise)
    assert torch.equal(model.weight, model2.weight)
    state, state2 = opt.state_dict(), opt2.state_dict()
    assert torch.equal(state["state"][0]["exp_avg_sq"], state2["state"][0]["exp_avg_sq"])
    assert state2["param_groups"][0]["betas"] == (0.5, 0.9)


def _state_step(path):
    return load_training_state(path, {}, {}, restore_rng=False)["step"]


def test_a_save_after_a_torn_last_checkpoint_keeps_the_readable_previous_one(tmp_path, monkeypatch):
    last, model = tmp_path / "last.safetensors", torch.nn.Linear(3, 3)
    save_training_state(last, {"m": model}, {}, step=1)
    save_training_state(last, {"m": model}, {}, step=2)
    assert _state_step(previous_path(last)) == 1
    last.write_bytes(last.read_bytes()[:200])  # torn: the run resumes from previous (step 1)
    assert not is_complete_safetensors(last) and is_complete_safetensors(previous_path(last))
    real_replace = os.replace

    def crash_before_the_new_last(src, dst):  # a crash between keeping the old file and renaming the new one
        if str(dst) == str(last):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_before_the_new_last)
    with pytest.raises(OSError, match="killed"):
        save_training_state(last, {"m": model}, {}, step=3)
    assert _state_step(previous_path(last)) == 1  # the torn file never replaced the good one
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    save_training_state(last, {"m": model}, {}, step=3)
    assert _state_step(last) == 3 and _state_step(previous_path(last)) == 1
    save_training_state(last, {"m": model}, {}, step=4)  # a whole last is kept as previous, as before
    assert _state_step(previous_path(last)) == 3
