"""Full-size SDXL structure: our UNet, text encoders and single-file layout against diffusers, transformers and
Stability's sgm files, built on the meta device (shapes only: no memory, no weights, nothing downloaded).

The references are the real model files' layouts:
- `stabilityai/stable-diffusion-xl-base-1.0` / `-refiner-1.0`: `unet/config.json` (`SDXL_BASE_UNET`,
  `SDXL_REFINER_UNET` below), `text_encoder/` (CLIPTextModel, ViT-L/14), `text_encoder_2/`
  (CLIPTextModelWithProjection, OpenCLIP ViT-bigG/14);
- `sd_xl_base_1.0.safetensors` (2515 tensors: 1680 UNet, 248 autoencoder, 197 CLIP ViT-L, 390 OpenCLIP bigG) and
  `sd_xl_refiner_1.0.safetensors` (bigG alone, as `conditioner.embedders.0.model.*`), with their sgm YAMLs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.config import AutoencoderConfig, ClipTextConfig, ConditioningConfig, UNetConfig
from latent_diffusion.formats.diffusers_config import unet_config_from_diffusers, unet_config_to_diffusers
from latent_diffusion.formats.keymaps import unet_state_from_diffusers, unet_state_to_diffusers
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.sdxl import (embedders_to_ours, encoders_to_embedders, from_transformers,
                                           transformers_names)
from latent_diffusion.formats.sdxl_original import from_sdxl_state_dict, sdxl_inference_config, to_sdxl_state_dict
from latent_diffusion.unet import UNetModel

from conftest import randomised

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

META = torch.device("meta")

# --- the real configs ----------------------------------------------------------------------------------------------

SDXL_BASE_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, as published
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_REFINER_UNET = {  # stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json: what differs from the base
    **SDXL_BASE_UNET, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
}
# the same networks as sgm's YAMLs (sd_xl_base.yaml, sd_xl_refiner.yaml) describe them
BASE_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
                       num_head_channels=64, transformer_depth=(1, 2, 10), context_dim=2048,
                       use_linear_in_transformer=True, adm_in_channels=2816)
REFINER_UNET = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                          attention_resolutions=(4, 2), num_head_channels=64, transformer_depth=4, context_dim=1280,
                          use_linear_in_transformer=True, adm_in_channels=2560)
VIT_L = ClipTextConfig(layer="penultimate", final_norm=False)  # SDXL reads CLIP ViT-L/14's penultimate states
VIT_BIGG = ClipTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, hidden_act="gelu", layer="penultimate",
                          final_norm=False, pad_token_id=0, projection_dim=1280)
SDXL_VAE = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_scale=0.13025)
BASE_CONDITIONING = ConditioningConfig(encoder="sdxl", clip=VIT_L, clip_2=VIT_BIGG, micro_conditioning="size")
REFINER_CONDITIONING = ConditioningConfig(encoder="sdxl", clip=None, clip_2=VIT_BIGG, micro_conditioning="aesthetic")
# transformers' configs of text_encoder/ and text_encoder_2/ (the architecture fields)
TRANSFORMERS_VIT_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)
TRANSFORMERS_VIT_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                             num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                             projection_dim=1280)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
EMBEDDER_CLIP, EMBEDDER_BIGG = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."
SGM_PREFIXES = (UNET, VAE, EMBEDDER_CLIP, EMBEDDER_BIGG, REFINER_BIGG)


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prefix_counts(keys) -> Counter:
    return Counter(next((p for p in SGM_PREFIXES if k.startswith(p)), "other") for k in keys)


# --- UNets against diffusers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["base", "refiner"])
def unets(request):
    """(real config.json, our config, our UNetModel, diffusers' UNet2DConditionModel), both built on meta."""
    config, cfg = {"base": (SDXL_BASE_UNET, BASE_UNET), "refiner": (SDXL_REFINER_UNET, REFINER_UNET)}[request.param]
    with META:
        ours, theirs = UNetModel(cfg), diffusers.UNet2DConditionModel.from_config(config)
    return config, cfg, ours, theirs


def test_sdxl_unet_parameter_counts_are_the_real_ones(unets):
    """The base has SDXL's 2,567,463,684 parameters; the refiner diffusers' count for its config (2,259,526,660)."""
    config, cfg, ours, theirs = unets
    expected = {2816: 2_567_463_684, 2560: 2_259_526_660}[cfg.adm_in_channels]
    assert parameters(ours) == parameters(theirs) == expected


def test_sdxl_unet_has_diffusers_keys_and_shapes_after_renaming(unets):
    """Every tensor of ours, renamed, is one of UNet2DConditionModel's with its shape, and back (base: 1680, refiner:
    1220 tensors; `label_emb.0.0/0.2` are `add_embedding.linear_1/2`)."""
    config, cfg, ours, theirs = unets
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert len(theirs_sd) == {2816: 1680, 2560: 1220}[cfg.adm_in_channels]
    renamed = unet_state_to_diffusers(cfg, ours_sd)
    assert shapes(renamed) == shapes(theirs_sd)
    assert renamed["add_embedding.linear_1.weight"] is ours_sd["label_emb.0.0.weight"]
    assert shapes(renamed)["add_embedding.linear_1.weight"] == (1280 if cfg.model_channels == 320 else 1536,
                                                              cfg.adm_in_channels)
    assert shapes(unet_state_from_diffusers(cfg, theirs_sd)) == shapes(ours_sd)


def test_sdxl_unet_config_is_read_from_and_written_as_the_real_config_json(unets):
    """The real config.json reads as the sgm YAML's network; ours builds the same diffusers model and reads back."""
    config, cfg, _, theirs = unets
    assert unet_config_from_diffusers(config) == (cfg, 128)
    written = unet_config_to_diffusers(cfg, 128)
    assert unet_config_from_diffusers(written) == (cfg, 128)
    with META:
        rebuilt = diffusers.UNet2DConditionModel.from_config(written)
    # the resolved settings diffusers builds from: the same, except that `upcast_attention` (fp16 only) is written
    # False where the real file has null, both off
    differences = {k: (v, rebuilt.config.get(k)) for k, v in theirs.config.items()
                   if rebuilt.config.get(k) != v and not k.startswith("_")}
    assert differences == {"upcast_attention": (None, False)}
    assert shapes(rebuilt.state_dict()) == shapes(theirs.state_dict())


# --- text encoders against transformers ------------------------------------------------------------------------------

def file_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's tensors under the names its files use: `text_model.*`, the projection at
    the top level. (transformers 5 keeps `CLIPTextModel`'s weights without the prefix in memory and renames them on
    loading; `CLIPTextModelWithProjection` and older versions keep it.)"""
    return {k if k == "text_projection.weight" else "text_model." + k.removeprefix("text_model."): v
            for k, v in state_dict.items()}


@pytest.mark.parametrize("ours_cfg, theirs_kw, model_class, count", [
    (VIT_L, TRANSFORMERS_VIT_L, "CLIPTextModel", 123_060_480),
    (VIT_BIGG, TRANSFORMERS_VIT_BIGG, "CLIPTextModelWithProjection", 694_659_840),
], ids=["vit_l", "vit_bigg"])
def test_text_encoders_have_the_transformers_keys_shapes_and_sizes(ours_cfg, theirs_kw, model_class, count):
    """Our names are transformers' without `text_model.` (bigG's projection at the top level, no bias), so the
    SDXL folders' text_encoder/ and text_encoder_2/ hold exactly our tensors."""
    with META:
        ours = ClipTextTransformer(ours_cfg)
        theirs = getattr(transformers, model_class)(transformers.CLIPTextConfig(**theirs_kw))
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert parameters(ours) == parameters(theirs) == count
    assert {k.removeprefix("text_model."): s for k, s in shapes(theirs_sd).items()} == shapes(ours_sd)
    assert shapes(transformers_names(ours_cfg, ours_sd)) == shapes(file_names(theirs_sd))
    for theirs_names in (theirs_sd, file_names(theirs_sd)):
        assert shapes(from_transformers(ours_cfg, theirs_names, model_class)) == shapes(ours_sd)
    assert ("text_projection.weight" in ours_sd) == (ours_cfg.projection_dim is not None)
    if ours_cfg.projection_dim is not None:
        assert shapes(theirs_sd)["text_projection.weight"] == (1280, 1280)
        assert len(ours_sd) == 32 * 16 + 5  # q/k/v apart here: 16 tensors a layer, 517 in all (390 in sgm files)


# --- Stability's sgm single files ------------------------------------------------------------------------------------

def meta_sdxl_parts(unet_cfg: UNetConfig, conditioning: ConditioningConfig) -> ModelParts:
    """A full-size SDXL base or refiner whose tensors live on the meta device."""
    with META:
        unet, vae = UNetModel(unet_cfg), AutoencoderKL(SDXL_VAE)
        encoders = {name: ClipTextTransformer(cfg) for name in ("clip", "clip_2")
                    if (cfg := getattr(conditioning, name)) is not None}
    text = {f"{name}.{k}": v for name, module in encoders.items() for k, v in module.state_dict().items()}
    return ModelParts(unet_config=unet_cfg, unet=unet.state_dict(), autoencoder_config=SDXL_VAE,
                      autoencoder=vae.state_dict(), conditioning=conditioning, text_encoder=text, resolution=1024)


@pytest.fixture(scope="module")
def base_parts() -> ModelParts:
    return meta_sdxl_parts(BASE_UNET, BASE_CONDITIONING)


@pytest.fixture(scope="module")
def base_file(base_parts) -> dict[str, torch.Tensor]:
    return to_sdxl_state_dict(base_parts)


SDXL_BASE_SHAPES = {  # as in sd_xl_base_1.0.safetensors
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3), UNET + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    UNET + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    UNET + "input_blocks.4.1.proj_in.weight": (640, 640),
    UNET + "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    UNET + "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    UNET + "middle_block.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
    UNET + "time_embed.0.weight": (1280, 320), UNET + "label_emb.0.0.weight": (1280, 2816),
    UNET + "label_emb.0.2.weight": (1280, 1280), UNET + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    UNET + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    UNET + "output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1), UNET + "out.2.weight": (4, 320, 3, 3),
    VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), VAE + "post_quant_conv.weight": (4, 4, 1, 1),
    EMBEDDER_CLIP + "text_model.embeddings.position_ids": (1, 77),
    EMBEDDER_CLIP + "text_model.embeddings.token_embedding.weight": (49408, 768),
    EMBEDDER_CLIP + "text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    EMBEDDER_CLIP + "text_model.final_layer_norm.weight": (768,),
    EMBEDDER_BIGG + "token_embedding.weight": (49408, 1280), EMBEDDER_BIGG + "positional_embedding": (77, 1280),
    EMBEDDER_BIGG + "transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    EMBEDDER_BIGG + "transformer.resblocks.31.attn.in_proj_bias": (3840,),
    EMBEDDER_BIGG + "transformer.resblocks.31.attn.out_proj.weight": (1280, 1280),
    EMBEDDER_BIGG + "transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    EMBEDDER_BIGG + "transformer.resblocks.31.mlp.c_proj.weight": (1280, 5120),
    EMBEDDER_BIGG + "ln_final.weight": (1280,), EMBEDDER_BIGG + "text_projection": (1280, 1280),
    EMBEDDER_BIGG + "logit_scale": (),
}


def test_sdxl_base_has_the_real_single_file_layout(base_parts, base_file):
    """2515 tensors as in sd_xl_base_1.0.safetensors. The OpenCLIP tower has 32 resblocks × 12 tensors (q/k/v fused
    into in_proj) + token/positional embedding, ln_final (2), text_projection, logit_scale = 390; the 517 of
    transformers' layout (q/k/v apart) is not the file's count."""
    assert sum(v.numel() for v in base_parts.autoencoder.values()) == 83_653_863
    assert prefix_counts(base_file) == {UNET: 1680, VAE: 248, EMBEDDER_CLIP: 196 + 1, EMBEDDER_BIGG: 32 * 12 + 6}
    assert len(base_file) == 2515
    got = shapes(base_file)
    assert {k: got[k] for k in SDXL_BASE_SHAPES} == SDXL_BASE_SHAPES
    assert not any(".resblocks.32." in k for k in base_file)  # the penultimate layer is read, all 32 are kept
    assert base_file[EMBEDDER_CLIP + "text_model.embeddings.position_ids"].dtype == torch.int64


def test_sdxl_base_configs_are_inferred_back_from_the_meta_tensors(base_parts, base_file):
    """UNet, autoencoder and both encoders' configs come back from the shapes alone (no YAML)."""
    back = from_sdxl_state_dict(base_file, {}, where="sd_xl_base_1.0.safetensors")
    assert (back.unet_config, back.autoencoder_config, back.conditioning) == (BASE_UNET, SDXL_VAE, BASE_CONDITIONING)
    assert back.resolution == 1024
    assert shapes(back.unet) == shapes(base_parts.unet)
    assert shapes(back.text_encoder) == shapes(base_parts.text_encoder)


@pytest.fixture(scope="module")
def refiner_file() -> dict[str, torch.Tensor]:
    return to_sdxl_state_dict(meta_sdxl_parts(REFINER_UNET, REFINER_CONDITIONING))


def test_sdxl_refiner_has_bigg_alone_as_the_first_embedder_and_reads_back(refiner_file):
    """The refiner's file: 1220 UNet tensors, the autoencoder, bigG as `conditioner.embedders.0.model.*`; read
    back, the 2560-wide vector says aesthetic-score micro-conditioning, and the UNet config builds the same
    network."""
    assert prefix_counts(refiner_file) == {UNET: 1220, VAE: 248, REFINER_BIGG: 390}
    assert shapes(refiner_file)[UNET + "label_emb.0.0.weight"] == (1536, 2560)
    back = from_sdxl_state_dict(refiner_file, {}, where="sd_xl_refiner_1.0.safetensors")
    assert (back.autoencoder_config, back.conditioning) == (SDXL_VAE, REFINER_CONDITIONING)
    with META:
        rebuilt = UNetModel(back.unet_config)
    assert shapes(rebuilt.state_dict()) == shapes(back.unet)


def test_sdxl_refiner_unet_config_reads_back_equal(refiner_file):
    """The same config as the refiner's diffusers config.json and sd_xl_refiner.yaml give (transformer_depth 4),
    so that one model read from either format has one config."""
    back = from_sdxl_state_dict(refiner_file, {}, where="sd_xl_refiner_1.0.safetensors")
    assert back.unet_config == REFINER_UNET


def test_bigg_projection_is_stored_transposed_and_encoders_round_trip_exactly():
    """sgm applies `text_projection` as `x @ P`, transformers as `x @ W.T`: P = W.T, shape (width, projection).
    Shown on small real tensors with a non-square projection (the full-size one is square)."""
    clip = dataclasses.replace(VIT_L, vocab_size=1000, eos_token_id=999, width=64, layers=2, heads=1, mlp_width=96)
    bigg = dataclasses.replace(VIT_BIGG, vocab_size=1000, eos_token_id=999, width=128, layers=3, heads=2,
                               mlp_width=160, projection_dim=48)
    conditioning = ConditioningConfig(encoder="sdxl", clip=clip, clip_2=bigg)
    text = {f"{name}.{k}": v for name, cfg, seed in (("clip", clip, 0), ("clip_2", bigg, 1))
            for k, v in randomised(ClipTextTransformer(cfg), seed).state_dict().items()}
    file = encoders_to_embedders(conditioning, text)
    projection = file["conditioner.embedders.1.model.text_projection"]
    assert projection.shape == (128, 48)
    assert torch.equal(projection, text["clip_2.text_projection.weight"].t())
    q, k, v = (text[f"clip_2.encoder.layers.2.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(file["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"],
                       torch.cat([q, k, v]))
    configs, weights = embedders_to_ours(file, "tiny")
    assert configs == {"clip": dataclasses.replace(clip, layer="last", final_norm=True),  # as the file says
                       "clip_2": dataclasses.replace(bigg, final_norm=True)}  # sdxl_clip() then sets SDXL's reading
    back = {f"{name}.{k}": t for name, tensors in weights.items() for k, t in tensors.items()}
    assert back.keys() == text.keys() and all(torch.equal(back[k], text[k]) for k in text)


# --- the sgm YAML written beside the file -----------------------------------------------------------------------------

def test_sgm_yaml_describes_the_base_network_as_sd_xl_base_yaml_does(base_parts):
    """`network_config.params` and the embedders as in sgm's configs/inference/sd_xl_base.yaml (architecture fields;
    `use_checkpoint` and the attention kernel are not architecture)."""
    params = sdxl_inference_config(base_parts)["model"]["params"]
    network = params["network_config"]["params"]
    assert {k: network[k] for k in ("adm_in_channels", "num_classes", "in_channels", "out_channels", "model_channels",
                                    "attention_resolutions", "num_res_blocks", "channel_mult", "num_head_channels",
                                    "use_linear_in_transformer", "transformer_depth", "context_dim")} == {
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
        "context_dim": 2048}
    assert params["scale_factor"] == 0.13025
    models = params["conditioner_config"]["params"]["emb_models"]
    assert [m["target"].rsplit(".", 1)[1] for m in models] == ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"] + [
        "ConcatTimestepEmbedderND"] * 3
    assert [m["input_key"] for m in models[2:]] == ["original_size_as_tuple", "crop_coords_top_left",
                                                    "target_size_as_tuple"]
    assert {k: models[1]["params"][k] for k in ("arch", "layer", "always_return_pooled", "legacy")} == {
        "arch": "ViT-bigG-14", "layer": "penultimate", "always_return_pooled": True, "legacy": False}


def test_sgm_yaml_reads_clip_vit_l_at_its_penultimate_layer(base_parts):
    """sgm's FrozenCLIPEmbedder(layer="hidden") returns `hidden_states[layer_idx]`, whose entry 0 is the embeddings:
    the penultimate of 12 layers is index 11 (sd_xl_base.yaml: `layer_idx: 11`; diffusers: `hidden_states[-2]`)."""
    models = sdxl_inference_config(base_parts)["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    assert models[0]["params"] == {"layer": "hidden", "layer_idx": 11}
