"""ControlNet files: a diffusers `ControlNetModel` folder loads and gives diffusers' residuals (plain and guess-mode
scales); its weights round-trip through the original `control_model.*` layout bit for bit and come back as a folder
diffusers loads; original files (.safetensors, .pth) are read by their shapes; `ldm convert` converts them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion.cli import main
from latent_diffusion.controlnet import ControlNet, ControlNetConfig, guess_mode_scales
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.controlnet import (PREFIX, is_controlnet, load_controlnet, read_original_controlnet,
                                                 save_controlnet)

from conftest import TINY_SD1, randomised

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-5


def tiny_diffusers_controlnet(folder, seed: int = 0, **changes):
    """A random ControlNetModel shaped like TINY_SD1's UNet, saved as a folder."""
    torch.manual_seed(seed)
    unet = TINY_SD1[0]
    config = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=unet.context_dim,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
                  norm_num_groups=32, conditioning_embedding_out_channels=(16, 32, 96, 256))
    model = diffusers.ControlNetModel(**{**config, **changes})
    with torch.no_grad():  # diffusers zero-initialises the zero convolutions and the hint's last conv: wake them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model.eval()


def inputs(latent: int = 8, factor: int = 8, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, latent, latent, generator=generator), torch.tensor([3.0, 917.0]),
            torch.rand(2, 3, latent * factor, latent * factor, generator=generator),
            torch.randn(2, 5, TINY_SD1[0].context_dim, generator=generator))


def theirs_residuals(model, x, t, hint, context, scale, guess_mode=False):
    with torch.no_grad():
        down, mid = model(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=scale,
                          guess_mode=guess_mode, return_dict=False)
    return [*down, mid]


def ours_residuals(net, x, t, hint, context, scale):
    with torch.no_grad():
        out = net(x, t, hint, context=context, scale=scale)
    return [*out.skips, out.middle]


def assert_close_all(a, b, tolerance=TOLERANCE):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("controlnet") / "diffusers"
    tiny_diffusers_controlnet(path)
    return path


@pytest.mark.parametrize("guess_mode", [False, True])
def test_a_diffusers_controlnet_gives_diffusers_residuals(folder, guess_mode):
    theirs = diffusers.ControlNetModel.from_pretrained(folder).eval()
    ours = load_controlnet(folder)
    x, t, hint, context = inputs()
    count = len(ours.input_blocks) + 1
    scale = guess_mode_scales(count, 0.7) if guess_mode else 0.7
    expected = theirs_residuals(theirs, x, t, hint, context, 0.7, guess_mode)
    assert_close_all(ours_residuals(ours, x, t, hint, context, scale), expected)
    assert max(r.abs().max() for r in expected) > 0.01  # the residuals are not all zero: the test could fail


def test_layouts_round_trip_bit_for_bit_and_diffusers_loads_ours(folder, tmp_path):
    net = load_controlnet(folder)
    save_controlnet(net, tmp_path / "control.safetensors", "original")
    again = load_controlnet(tmp_path / "control.safetensors")
    assert again.config == net.config
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))
    save_controlnet(again, tmp_path / "back", "diffusers")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "back").eval()
    original = diffusers.ControlNetModel.from_pretrained(folder).eval()
    assert theirs.config.conditioning_embedding_out_channels == original.config.conditioning_embedding_out_channels
    x, t, hint, context = inputs()
    assert_close_all(theirs_residuals(theirs, x, t, hint, context, 1.0),
                     theirs_residuals(original, x, t, hint, context, 1.0), 0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_files_are_read_by_their_shapes(folder, tmp_path, suffix):
    """Files as lllyasviel ships them (no metadata of ours): the architecture comes from the weights."""
    net = load_controlnet(folder)
    state = {PREFIX + k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / f"control_tiny{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    cfg, tensors = read_original_controlnet(path)
    assert cfg == net.config and tensors.keys() == net.state_dict().keys()
    assert is_controlnet(path)
    assert main(["convert", str(path), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 load_controlnet(tmp_path / "d").state_dict().values(), strict=True))


def test_is_controlnet_looks_at_the_keys_without_loading(tmp_path):
    """A pickle's keys are read from its opcodes (nothing unpickled); other models and legacy pickles are not
    ControlNets here (load_model then says what they are)."""
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, tmp_path / "sd.ckpt")
    torch.save({"input_hint_block.0.weight": torch.zeros(1)}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "sd.ckpt").read_bytes()[:100])
    assert not any(is_controlnet(tmp_path / name) for name in ("sd.ckpt", "legacy.pth", "cut.pth", "missing.pth"))


def test_a_controlnet_for_an_f4_autoencoder_takes_a_hint_four_times_the_latents(tmp_path):
    net = randomised(ControlNet(ControlNetConfig.of_unet(TINY_SD1[0], downsample_factor=4)), 1)
    assert net.config.conditioning_channels == (32, 96, 256) and net.config.hint_factor == 4
    save_controlnet(net, tmp_path / "f4", "diffusers")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "f4").eval()
    x, t, hint, context = inputs(factor=4)
    assert_close_all(ours_residuals(net, x, t, hint, context, 1.0), theirs_residuals(theirs, x, t, hint, context, 1.0))


def test_ldm_convert_converts_controlnets_both_ways(folder, tmp_path, capsys):
    assert main(["convert", str(folder), str(tmp_path / "c.safetensors"), "--to", "original"]) == 0
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    a, b = load_controlnet(folder).state_dict(), load_controlnet(tmp_path / "d").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "ControlNet" in capsys.readouterr().out


def test_files_that_are_not_controlnets_are_clear_errors(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="ControlNet not found"):
        load_controlnet(tmp_path / "missing.safetensors")
