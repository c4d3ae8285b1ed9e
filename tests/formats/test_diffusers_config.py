"""The real SD 1.5 / 2.1 diffusers configs: read into ours, and the key maps cover every tensor of the models they
describe (built on the meta device)."""

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning import ClipTextTransformer
from latent_diffusion.config import AutoencoderConfig, ClipTextConfig, DiffusionConfig, UNetConfig
from latent_diffusion.formats.diffusers_config import (clip_config_from_transformers, scheduler_config_from_diffusers,
                                                       unet_config_from_diffusers, vae_config_from_diffusers)
from latent_diffusion.formats.keymaps import clip_state_to_transformers, unet_state_to_diffusers, vae_state_to_diffusers
from latent_diffusion.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD21_UNET = {**SD15_UNET, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
             "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
             "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True,
             "upcast_attention": True}
SD_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
          "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD21_TEXT = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
             "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
             "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408}
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}


def test_real_stable_diffusion_configs_are_read():
    sd2_unet = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
    assert unet_config_from_diffusers(SD15_UNET) == (UNetConfig(), 64)
    assert unet_config_from_diffusers(SD21_UNET) == (sd2_unet, 96)
    assert vae_config_from_diffusers(SD_VAE) == AutoencoderConfig(resolution=512, latent_scale=0.18215)
    assert clip_config_from_transformers(SD21_TEXT, 49407, 0) == ClipTextConfig(
        width=1024, layers=23, heads=16, mlp_width=4096, hidden_act="gelu", pad_token_id=0)
    diffusion, sampling = scheduler_config_from_diffusers(SD21_SCHEDULER)
    assert DiffusionConfig(**diffusion) == DiffusionConfig(prediction_type="v_prediction")
    assert sampling == {"sampler": "ddim", "steps_offset": 1, "timestep_spacing": None, "set_alpha_to_one": False}
    diffusion, sampling = scheduler_config_from_diffusers(SD15_SCHEDULER)
    assert DiffusionConfig(**diffusion) == DiffusionConfig() and sampling["sampler"] == "plms"


@pytest.mark.parametrize("config", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_unet_key_map_covers_the_real_stable_diffusion_layouts(config):
    """Every key and shape of the full-size diffusers UNet (built on the meta device) has its counterpart in ours."""
    cfg, _ = unet_config_from_diffusers(config)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(config).state_dict()
        ours = UNetModel(cfg).state_dict()
    converted = unet_state_to_diffusers(cfg, ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}


def test_autoencoder_key_map_covers_the_real_stable_diffusion_layout():
    cfg = vae_config_from_diffusers(SD_VAE)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL.from_config(SD_VAE).state_dict()
        ours = AutoencoderKL(cfg).state_dict()
    converted = vae_state_to_diffusers(cfg, ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}


def test_text_encoder_key_map_covers_the_real_stable_diffusion_2_layout():
    cfg = clip_config_from_transformers(SD21_TEXT, 49407, 0)
    with torch.device("meta"):
        theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD21_TEXT)).state_dict()
        ours = ClipTextTransformer(cfg).state_dict()
    converted = clip_state_to_transformers(cfg, ours)
    theirs = {k.removeprefix("text_model."): v.shape for k, v in theirs.items()}  # transformers 5 drops the prefix
    assert {k.removeprefix("text_model."): v.shape for k, v in converted.items()} == theirs
