"""Vector quantisation: nearest codes with straight-through gradients and VQ-VAE's two loss terms; the codebook
learnt by moving averages; unused codes restarted; usage and perplexity; and the VQ autoencoder against diffusers'
VQModel on the same (random) weights, with CompVis' key layout at full size."""

import pytest
import torch

from latent_diffusion.autoencoder import VectorQuantizer, VQAutoencoder, build_autoencoder
from latent_diffusion.config import AutoencoderConfig
from latent_diffusion.formats.keymaps import vae_state_to_diffusers, vae_to_diffusers

from conftest import randomised, tiny_autoencoder_config


def test_each_vector_becomes_its_nearest_code_and_gradients_pass_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    codebook = vq.embedding.weight.detach()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(out.indices.flatten(), torch.cdist(flat, codebook).argmin(1))
    assert torch.allclose(out.z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), codebook[out.indices.flatten()])
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight through
    commitment = ((z.detach() - out.z_q.detach()) ** 2).mean()
    assert out.loss.item() == pytest.approx(1.25 * commitment.item(), rel=1e-5)  # β·commitment + codebook term
    probs = torch.bincount(out.indices.flatten(), minlength=8).float() / 32
    nonzero = probs[probs > 0]
    assert out.perplexity.item() == pytest.approx(torch.exp(-(nonzero * nonzero.log()).sum()).item(), rel=1e-5)
    assert out.usage.item() == (probs > 0).float().mean().item()


def test_moving_averages_pull_each_code_to_the_mean_of_its_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, ema_decay=0.5).train()
    vq.embedding.weight.data = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    points = torch.tensor([[-3.0, 1.0], [-3.0, -1.0], [2.0, 1.0], [2.0, 3.0]])
    for _ in range(40):
        vq(points.T.reshape(1, 2, 2, 2))
    assert torch.allclose(vq.embedding.weight, torch.tensor([[-3.0, 0.0], [2.0, 2.0]]), atol=1e-3)
    assert not vq.embedding.weight.requires_grad  # learnt by averages, not by its loss term
    z = points.T.reshape(1, 2, 2, 2).clone().requires_grad_(True)
    assert vq(z).loss.item() == pytest.approx(0.25 * ((z - vq(z).z_q) ** 2).mean().item(), rel=1e-4)


def test_codes_nobody_chose_are_restarted_from_the_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, restart_after=3).train()
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]])
    batch = torch.randn(1, 2, 4, 4) * 0.1
    for _ in range(2):
        assert vq(batch).usage.item() == 0.25
    vq(batch)  # the third step without them: codes 1-3 start again from vectors of this batch
    vectors = batch.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in vq.embedding.weight[1:]:
        assert (vectors - code).abs().sum(1).min() < 1e-6
    assert vq(batch).usage.item() > 0.25


def tiny_vq_config(**kw) -> AutoencoderConfig:
    return tiny_autoencoder_config(resolution=32, z_channels=3, embed_dim=3, regularizer="vq", n_embed=32, **kw)


def test_the_vq_autoencoder_encodes_before_and_decodes_after_quantisation():
    model = randomised(VQAutoencoder(tiny_vq_config()), 0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = model.encode(x).mode()
        assert torch.equal(h, model.quant_conv(model.encoder(x)))
        assert torch.allclose(model.encode(x).sample(), h, atol=1e-5)  # a point mass
        codes = model.quantize(h).indices
        assert torch.allclose(model.decode(h), model.decode_codes(codes), atol=1e-6)
        assert torch.allclose(model(x)[0], model.decode(h), atol=1e-6)
    learning = randomised(VQAutoencoder(tiny_vq_config(vq_ema_decay=0.5, vq_restart_after=1)), 0).train()
    codebook = learning.quantize.embedding.weight.clone()
    with torch.no_grad():
        learning.decode(h)  # decoding looks codes up: it never trains the codebook, in train mode either
    assert torch.equal(learning.quantize.embedding.weight, codebook) and not learning.quantize.cluster_size.numel()
    assert isinstance(build_autoencoder(tiny_vq_config()), VQAutoencoder)
    with pytest.raises(ValueError, match="model.regularizer"):
        tiny_autoencoder_config(regularizer="fsq")


def test_the_vq_autoencoder_is_diffusers_vqmodel():
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny_vq_config()
    ours = randomised(VQAutoencoder(cfg), 1)
    theirs = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                               up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                               layers_per_block=1, latent_channels=3, num_vq_embeddings=32, norm_num_groups=4,
                               vq_embed_dim=3, sample_size=32).eval()
    theirs.load_state_dict(vae_state_to_diffusers(cfg, ours.state_dict()))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = ours.encode(x).mode()
        assert torch.allclose(h, theirs.encode(x).latents, atol=1e-5)
        assert torch.allclose(ours.decode(h), theirs.decode(h).sample, atol=1e-5)


def test_compvis_vq_f4_layout_at_full_size():
    """The vq-f4 first stage of the LDM release (models/first_stage_models/vq-f4/config.yaml: embed_dim 3, n_embed
    8192, ch 128, ch_mult [1, 2, 4], two ResNet blocks, attention only in the middle) on the meta device: CompVis'
    key names, and one to one with diffusers' VQModel of that size (the LDM x4 upscaler's `vqvae`)."""
    diffusers = pytest.importorskip("diffusers")
    cfg = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3,
                            resolution=256, regularizer="vq", n_embed=8192)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VQAutoencoder(cfg).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in diffusers.VQModel(
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[128, 256, 512], layers_per_block=2, latent_channels=3, num_vq_embeddings=8192,
            vq_embed_dim=3).state_dict().items()}
    assert ours["quantize.embedding.weight"] == (8192, 3)
    assert ours["encoder.conv_out.weight"] == (3, 512, 3, 3)  # no double_z
    assert ours["quant_conv.weight"] == (3, 3, 1, 1) and ours["post_quant_conv.weight"] == (3, 3, 1, 1)
    assert "encoder.down.2.downsample.conv.weight" not in ours and "encoder.mid.attn_1.q.weight" in ours
    mapping = vae_to_diffusers(cfg)
    assert sorted(mapping.values()) == sorted(theirs) and len(ours) == len(theirs)
    for key, shape in ours.items():
        assert theirs[mapping[key]] in (shape, shape[:2]), key  # attention's 1x1 convs are Linear there
