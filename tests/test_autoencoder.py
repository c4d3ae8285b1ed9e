"""The KL autoencoder: shapes for every f, the Gaussian posterior, input checks, CompVis/SD key layout."""

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from latent_diffusion.config import AutoencoderConfig

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


def test_kl_matches_closed_form_against_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 5)
    q = DiagonalGaussianDistribution(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), ref, rtol=1e-5, atol=1e-5)


def test_posterior_sample_has_the_posterior_moments():
    mean = torch.full((1, 2, 64, 64), 0.5)
    logvar = torch.full((1, 2, 64, 64), 2 * torch.log(torch.tensor(0.25)).item())
    q = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.25) < 0.01
    assert torch.equal(q.mode(), mean)


def test_logvar_is_clamped():
    q = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -100.0)], 1))
    assert q.logvar.min().item() == -30.0


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
