"""Safetensors checkpoints: identical outputs after reload, full training state, atomic writes, bad files."""

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.files.weights import (CheckpointError, load_module_weights, load_weights, module_from_weights,
                                            save_weights)
from latent_diffusion.training.state import load_training_state, save_training_state

from conftest import tiny_autoencoder_config


def test_save_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_autoencoder_config()).eval()
    save_weights(model.state_dict(), tmp_path / "ae.safetensors")
    torch.manual_seed(1)
    other = AutoencoderKL(tiny_autoencoder_config()).eval()
    load_module_weights(other, load_weights(tmp_path / "ae.safetensors"), "ae")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, sample_posterior=False)[0], other(x, sample_posterior=False)[0])


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


def test_mismatched_weights_name_the_problem(tmp_path):
    save_weights(AutoencoderKL(tiny_autoencoder_config(z_channels=3, embed_dim=3)).state_dict(), tmp_path / "a.st")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_module_weights(AutoencoderKL(tiny_autoencoder_config()), load_weights(tmp_path / "a.st"), "a.st")


def test_truncated_checkpoint_is_reported_by_name(tmp_path):
    path = tmp_path / "t.safetensors"
    save_weights({"w": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def failing_writer():
        from latent_diffusion.files.atomic import atomic_path
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        failing_writer()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_module_from_weights_builds_without_init_and_copies_cast_weights():
    from latent_diffusion.autoencoder.pixel import PixelSpace, pixel_space_config
    source = AutoencoderKL(tiny_autoencoder_config()).state_dict()
    built = module_from_weights(lambda: AutoencoderKL(tiny_autoencoder_config()), source, "ae", torch.bfloat16)
    assert not any(t.is_meta for t in built.state_dict().values())
    for key, value in built.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, source[key].bfloat16())
    built.decoder.conv_out.weight.data.zero_()  # a copy: the source weights are not shared
    assert source["decoder.conv_out.weight"].abs().sum() > 0
    with pytest.raises(CheckpointError, match="ae does not match the model config: 1 missing keys"):
        module_from_weights(lambda: AutoencoderKL(tiny_autoencoder_config()),
                            {k: v for k, v in source.items() if k != "decoder.conv_out.bias"}, "ae")
    pixels = module_from_weights(lambda: PixelSpace(pixel_space_config(3, 32)), {}, "pixels")
    assert pixels.anchor.device.type == "cpu"  # its empty non-persistent buffer is made, not left on meta
