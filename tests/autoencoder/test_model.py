"""The KL autoencoder: shapes for every f, input checks, the CompVis/SD key layout, tiled decoding."""

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.config import AutoencoderConfig
from latent_diffusion.data.fashion_mnist import DEFAULT_ROOT as FASHION_ROOT, FashionMNIST

from conftest import tiny_autoencoder_config


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_latent_and_output_shapes_for_each_downsampling_factor(levels):
    f = 2 ** (levels - 1)
    cfg = tiny_autoencoder_config(ch_mult=(1,) * levels, resolution=32, z_channels=3, embed_dim=3)
    model = AutoencoderKL(cfg)
    x = torch.randn(2, 3, 32, 48)  # non-square works too
    posterior = model.encode(x)
    assert model.downsample_factor == f
    assert posterior.mean.shape == (2, 3, 32 // f, 48 // f)
    assert model.decode(posterior.sample()).shape == x.shape


def test_wrong_channel_count_is_a_clear_error():
    model = AutoencoderKL(tiny_autoencoder_config())
    with pytest.raises(ValueError, match=r"expected 3 input channels \(model.in_channels\), got 1"):
        model.encode(torch.randn(1, 1, 16, 16))


def test_size_not_divisible_by_f_is_a_clear_error():
    model = AutoencoderKL(tiny_autoencoder_config(ch_mult=(1, 1, 1)))
    with pytest.raises(ValueError, match=r"image size 18x16 is not divisible by the downsampling factor f=4"):
        model.encode(torch.randn(1, 3, 18, 16))


def test_stable_diffusion_vae_layout():
    """The SD v1/v2 VAE config has exactly the CompVis `first_stage_model.*` keys and 83,653,863 parameters."""
    sd = AutoencoderKL(AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                                         embed_dim=4, resolution=256)).state_dict()
    assert len(sd) == 248
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.norm2.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("decoder.up.0.upsample") or k.startswith("encoder.down.3.downsample") for k in sd)


def test_tiles_are_few_equal_and_blend_to_one():
    from latent_diffusion.autoencoder.model import _ramp, _tiles
    assert _tiles(64, 64, 16) == ([0], 64)
    assert _tiles(128, 64, 16) == ([0, 37, 74], 54)  # three equal tiles, not two full ones and a sliver
    for size, tile, overlap in ((128, 64, 16), (100, 64, 16), (20, 8, 2), (9, 4, 1), (300, 64, 16)):
        starts, length = _tiles(size, tile, overlap)
        assert length <= tile and starts[0] == 0 and starts[-1] + length == size
        assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))  # overlaps of at least `overlap`
        total = torch.zeros(size)
        for i, s in enumerate(starts):
            total[s:s + length] += _ramp(length, overlap, i > 0, i < len(starts) - 1)
        assert total.min() > 0.5 and total.max() <= 2  # never a hole (the decode divides by this sum)


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_tiled_decode_reconstructs_as_well_as_whole_decode():
    """The shipped Fashion autoencoder on a 96×64 mosaic of test images (a 24×16 latent): decoding in 8×8 tiles
    that overlap by 4 reconstructs about as well as decoding whole, and the blending beats abutting tiles."""
    from pathlib import Path

    from latent_diffusion.evaluation.metrics import psnr
    from latent_diffusion.formats.autoencoder import load_autoencoder
    model, _ = load_autoencoder(Path(__file__).parents[2] / "models" / "autoencoder-fashion-f4")
    data = FashionMNIST(split="test", resolution=32)
    tiles = [data[i]["image"] for i in range(6)]
    mosaic = torch.cat([torch.cat(tiles[r * 2:r * 2 + 2], -1) for r in range(3)], -2)[None]
    with torch.no_grad():
        z = model.encode(mosaic).mode()
        quality = {name: psnr(out.clamp(-1, 1), mosaic).item() for name, out in
                   (("whole", model.decode(z)), ("blended", model.decode_tiled(z, tile=8, overlap=4)),
                    ("abutting", model.decode_tiled(z, tile=8, overlap=0)))}
        assert model.decode_tiled(z, tile=8).shape == mosaic.shape
        assert torch.equal(model.decode_tiled(z[..., :8, :8], tile=8), model.decode(z[..., :8, :8]))
    assert quality["blended"] > quality["whole"] - 1.0 and quality["blended"] > quality["abutting"] + 1.0, quality
    with pytest.raises(ValueError, match="overlap"):
        model.decode_tiled(z, tile=8, overlap=8)
