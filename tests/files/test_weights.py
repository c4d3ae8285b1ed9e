"""Safetensors weights: identical outputs after reload, bad files named, modules built around the weights given (no
copies), tensors read cast into aligned memory."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.config import UNetConfig
from latent_diffusion.files.weights import (CheckpointError, load_module_weights, load_weights, module_from_weights,
                                            read_weights, save_weights)
from latent_diffusion.unet import UNetModel

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


def test_module_from_weights_holds_the_tensors_given_in_its_dtype_not_copies():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                     context_dim=32, norm_groups=8)
    tensors = {k: torch.randn(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
    same = module_from_weights(lambda: UNetModel(cfg), tensors, "UNet weights")
    cast = module_from_weights(lambda: UNetModel(cfg), tensors, "UNet weights", torch.bfloat16)
    assert all(v.data_ptr() == tensors[k].data_ptr() for k, v in same.state_dict().items())
    assert all(torch.equal(v, tensors[k].bfloat16()) for k, v in cast.state_dict().items())


def test_read_weights_reads_the_selected_tensors_cast_into_aligned_memory_of_their_own(tmp_path):
    stored = {"odd": torch.randn(3, dtype=torch.float16), "a.weight": torch.randn(5, 7),
              "a.steps": torch.arange(4), "b.weight": torch.randn(2, 2)}  # "odd" puts the next tensors off 8 bytes
    save_file(stored, tmp_path / "w.safetensors")
    read = read_weights(tmp_path / "w.safetensors", torch.bfloat16, keys=lambda k: k.startswith("a."))
    mapped = load_file(tmp_path / "w.safetensors")
    assert read["a.weight"].dtype == torch.bfloat16 and torch.equal(read["a.weight"], stored["a.weight"].bfloat16())
    assert read["a.steps"].dtype == torch.int64 and torch.equal(read["a.steps"], stored["a.steps"])
    assert all(read[k].data_ptr() % 64 == 0 for k in ("a.weight", "a.steps"))
    assert read["b.weight"].dtype == torch.float32 and torch.equal(read["b.weight"], mapped["b.weight"])
