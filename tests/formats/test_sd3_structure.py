"""Full-size SD3 structure: our MMDiT, VAE and text encoders against diffusers' and transformers' models built from
the published configs, and the single-file layout, all on the meta device (shapes only: nothing downloaded).

The references are the released folders' configs: `stabilityai/stable-diffusion-3-medium-diffusers`,
`stable-diffusion-3.5-large` and `stable-diffusion-3.5-medium` (`transformer/config.json`), SD3's `vae/config.json`
and T5-XXL v1.1's `text_encoder_3/config.json`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.config import ClipTextConfig
from latent_diffusion.formats.diffusers_config import vae_config_from_diffusers
from latent_diffusion.formats.keymaps import vae_state_from_diffusers
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.sd3 import (SD3_DIFFUSION, infer_mmdit_config, mmdit_config_from_diffusers,
                                          mmdit_state_from_diffusers, mmdit_state_to_diffusers, sd3_conditioning)
from latent_diffusion.formats.sd3_original import _infer_t5_config, from_sd3_state_dict, to_sd3_state_dict
from latent_diffusion.mmdit import MMDiT
from sd3_fixtures import tiny_t5_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

META = torch.device("meta")
SD3_TRANSFORMERS = {  # transformer/config.json of each release (the fields that differ from diffusers' defaults)
    "sd3-medium": {"attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
                   "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
                   "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128},
    "sd3.5-large": {"attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16,
                    "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38, "out_channels": 16,
                    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
                    "qk_norm": "rms_norm"},
    "sd3.5-medium": {"attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
                     "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
                     "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "sample_size": 128,
                     "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))},
}
SD3_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
           "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
           "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_post_quant_conv": False,
           "use_quant_conv": False}
T5_XXL = {"d_ff": 10240, "d_kv": 64, "d_model": 4096, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}
CLIP_L = ClipTextConfig(width=768, layers=12, heads=12, mlp_width=3072, projection_dim=768)
CLIP_G = ClipTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, hidden_act="gelu", pad_token_id=0,
                        projection_dim=1280)
# learned parameters (the stored position grid, a fixed buffer, aside): SD3 Medium's published 2B, SD3.5's 8.1B, 2.5B
PARAMETERS = {"sd3-medium": 2_028_328_000, "sd3.5-large": 8_056_627_520, "sd3.5-medium": 2_243_171_520}


def _count(tensors) -> int:
    return sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("release", SD3_TRANSFORMERS)
def test_the_released_mmdits_have_diffusers_keys_shapes_and_parameter_counts(release):
    config = SD3_TRANSFORMERS[release]
    cfg, sample_size = mmdit_config_from_diffusers(config)
    with META:
        theirs = diffusers.SD3Transformer2DModel(**config).state_dict()
        ours = MMDiT(cfg).state_dict()
    converted = mmdit_state_from_diffusers(cfg, theirs)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}
    assert mmdit_state_to_diffusers(cfg, ours).keys() == theirs.keys()
    assert _count(ours) == _count(theirs)
    assert _count(ours) - ours["pos_embed"].numel() == PARAMETERS[release]
    assert infer_mmdit_config(ours, None, release) == cfg  # what a single file's shapes say, heads 64 wide
    assert sample_size * 8 == 1024


def test_the_sd3_vae_and_t5_xxl_have_the_reference_layouts():
    vae_cfg = vae_config_from_diffusers(SD3_VAE)
    assert (vae_cfg.embed_dim, vae_cfg.latent_scale, vae_cfg.latent_shift, vae_cfg.quant_conv) == (16, 1.5305, 0.0609,
                                                                                                  False)
    with META:
        theirs = diffusers.AutoencoderKL(**{k: v for k, v in SD3_VAE.items() if not k.startswith("_")}).state_dict()
        ours = AutoencoderKL(vae_cfg).state_dict()
    converted = vae_state_from_diffusers(vae_cfg, theirs)
    assert converted.keys() == ours.keys() and _count(ours) == _count(theirs) == 83_819_683
    with META:
        t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_XXL)).state_dict()
    inferred = _infer_t5_config(t5)
    assert {k: inferred[k] for k in T5_XXL if k in inferred} == {k: T5_XXL[k] for k in inferred if k in T5_XXL}
    assert _count({k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}) == 4_762_310_656


def test_an_sd3_medium_single_file_has_stabilitys_layout_and_reads_back(tmp_path):
    tiny_t5_tokenizer().save_pretrained(tmp_path / "tokenizer_3")
    cfg, _ = mmdit_config_from_diffusers(SD3_TRANSFORMERS["sd3-medium"])
    vae_cfg = vae_config_from_diffusers(SD3_VAE)
    conditioning = sd3_conditioning(CLIP_L, CLIP_G, T5_XXL)
    with META:
        text = {f"{name}.{k}": v for name, clip in (("clip", CLIP_L), ("clip_2", CLIP_G))
                for k, v in ClipTextTransformer(clip).state_dict().items()}
        t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_XXL)).state_dict()
        parts = ModelParts(unet_config=cfg, unet=MMDiT(cfg).state_dict(), autoencoder_config=vae_cfg,
                           autoencoder=AutoencoderKL(vae_cfg).state_dict(), conditioning=conditioning,
                           diffusion=SD3_DIFFUSION,
                           text_encoder={**text, **{f"t5.{k}": v for k, v in t5.items()
                                                    if k != "encoder.embed_tokens.weight"}})
    tensors, metadata = to_sd3_state_dict(parts)
    counts = Counter(".".join(k.split(".")[:2]) for k in tensors)
    assert counts == {"model.diffusion_model": 491, "first_stage_model.encoder": 106,
                      "first_stage_model.decoder": 138, "text_encoders.clip_l": 197, "text_encoders.clip_g": 517,
                      "text_encoders.t5xxl": 219}
    assert "text_encoders.clip_g.transformer.text_projection.weight" in tensors
    back = from_sd3_state_dict(tensors, {}, "sd3_medium_incl_clips_t5xxl", tmp_path / "tokenizer_3")
    assert back.unet_config == cfg and back.autoencoder_config == dataclasses.replace(vae_cfg, resolution=256)
    assert back.conditioning.clip == conditioning.clip and back.conditioning.clip_2 == conditioning.clip_2
