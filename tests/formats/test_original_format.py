"""Original single-file Stable Diffusion checkpoints: real SD 1.5 / 2.1 key layouts, config inference, OpenCLIP
parity, diffusers' own single-file loader, safe pickles and clear errors for files we cannot read."""

import json
import math
import os
import pickle
import shlex
import sys
from collections import Counter, OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.config import AutoencoderConfig, ClipTextConfig, ConditioningConfig, DiffusionConfig, UNetConfig
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.model import ModelParts, load_model, save_model
from latent_diffusion.formats.original_format import (SD_SAMPLING, from_original_state_dict, load_original_state_dict,
                                                      read_original, to_original_state_dict, write_original)
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.unet import UNetModel

from conftest import TINY_SD1, assert_same_parts, randomised, tiny_original_parts

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
SD15_UNET = UNetConfig()
SD21_UNET = UNetConfig(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
SD_VAE = AutoencoderConfig(ch_mult=(1, 2, 4, 4), latent_scale=0.18215)
VIT_L_TEXT = ClipTextConfig()
VIT_H_TEXT = ClipTextConfig(width=1024, layers=24, heads=16, mlp_width=4096, hidden_act="gelu", layer="penultimate",
                            pad_token_id=0)
TINY_SD2 = (UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_head_channels=64, transformer_depth=2, context_dim=64, use_linear_in_transformer=True),
            ClipTextConfig(width=64, layers=3, heads=1, mlp_width=128, hidden_act="gelu", layer="penultimate",
                           pad_token_id=0))


def meta_parts(unet_cfg: UNetConfig, clip_cfg: ClipTextConfig) -> ModelParts:
    """A full-size model whose tensors live on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        unet, vae, text = UNetModel(unet_cfg), AutoencoderKL(SD_VAE), ClipTextTransformer(clip_cfg)
    return ModelParts(unet_config=unet_cfg, unet=unet.state_dict(), autoencoder_config=SD_VAE,
                      autoencoder=vae.state_dict(), conditioning=ConditioningConfig(encoder="clip", clip=clip_cfg),
                      text_encoder=text.state_dict())


def original_shapes(parts: ModelParts) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in to_original_state_dict(parts).items()}


def prefix_counts(keys) -> Counter:
    prefixes = (UNET, VAE, SD1_TEXT, SD2_TEXT)
    return Counter(next((p for p in prefixes if k.startswith(p)), "other") for k in keys)


# --- full-size layouts: the key names and shapes of the real SD 1.5 and SD 2.1 files -------------------------

SD15_SHAPES = {  # as in v1-5-pruned-emaonly.safetensors
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3), UNET + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    UNET + "middle_block.1.proj_in.weight": (1280, 1280, 1, 1), UNET + "time_embed.0.weight": (1280, 320),
    UNET + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1), UNET + "out.2.weight": (4, 320, 3, 3),
    VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), VAE + "quant_conv.weight": (8, 8, 1, 1),
    VAE + "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    VAE + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    SD1_TEXT + "embeddings.token_embedding.weight": (49408, 768), SD1_TEXT + "embeddings.position_ids": (1, 77),
    SD1_TEXT + "encoder.layers.11.mlp.fc1.weight": (3072, 768), SD1_TEXT + "final_layer_norm.weight": (768,),
}
SD21_SHAPES = {  # as in v2-1_768-ema-pruned.safetensors
    UNET + "input_blocks.1.1.proj_in.weight": (320, 320),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    UNET + "middle_block.1.proj_out.weight": (1280, 1280),
    UNET + "output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    SD2_TEXT + "token_embedding.weight": (49408, 1024), SD2_TEXT + "positional_embedding": (77, 1024),
    SD2_TEXT + "transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    SD2_TEXT + "transformer.resblocks.0.attn.in_proj_bias": (3072,),
    SD2_TEXT + "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
    SD2_TEXT + "transformer.resblocks.23.attn.out_proj.weight": (1024, 1024),
    SD2_TEXT + "text_projection": (1024, 1024), SD2_TEXT + "logit_scale": (), SD2_TEXT + "ln_final.weight": (1024,),
}


def test_sd15_shaped_model_has_the_real_checkpoint_layout():
    parts = meta_parts(SD15_UNET, VIT_L_TEXT)
    assert sum(v.numel() for v in parts.unet.values()) == 859_520_964
    assert sum(v.numel() for v in parts.autoencoder.values()) == 83_653_863
    assert sum(v.numel() for v in parts.text_encoder.values()) == 123_060_480
    shapes = original_shapes(parts)
    assert prefix_counts(shapes) == {UNET: 686, VAE: 248, SD1_TEXT: 196 + 1}  # + embeddings.position_ids
    assert {k: shapes[k] for k in SD15_SHAPES} == SD15_SHAPES


def test_sd21_shaped_model_has_the_real_checkpoint_layout():
    parts = meta_parts(SD21_UNET, VIT_H_TEXT)
    assert sum(v.numel() for v in parts.unet.values()) == 865_910_724
    shapes = original_shapes(parts)
    # OpenCLIP ViT-H/14 text tower: 24 resblocks × 12 tensors + token/positional embedding, ln_final (2),
    # text_projection, logit_scale (as listed by diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE and kohya's writer)
    assert prefix_counts(shapes) == {UNET: 686, VAE: 248, SD2_TEXT: 24 * 12 + 6}
    assert {k: shapes[k] for k in SD21_SHAPES} == SD21_SHAPES


@pytest.mark.parametrize("unet_cfg, clip_cfg", [(SD15_UNET, VIT_L_TEXT), (SD21_UNET, VIT_H_TEXT)],
                         ids=["sd15", "sd21"])
def test_full_size_configs_are_inferred_from_shapes_alone(unet_cfg, clip_cfg):
    parts = meta_parts(unet_cfg, clip_cfg)
    back = from_original_state_dict(to_original_state_dict(parts))
    assert (back.unet_config, back.autoencoder_config, back.conditioning.clip) == (unet_cfg, SD_VAE, clip_cfg)


# --- round trips on tiny models -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_sd1_round_trip_is_exact(tmp_path, suffix):
    parts = tiny_original_parts(TINY_SD1)
    save_model(parts, tmp_path / f"model{suffix}", "original")
    assert (tmp_path / "model.yaml").is_file()
    assert_same_parts(load_model(tmp_path / f"model{suffix}"), parts)


def test_tiny_sd2_v_prediction_round_trip_is_exact_through_the_yaml(tmp_path):
    parts = tiny_original_parts(TINY_SD2, "v_prediction", resolution=768, num_head_channels=32, dropout=0.1)
    write_original(parts, tmp_path / "v2.safetensors")
    assert_same_parts(read_original(tmp_path / "v2.safetensors"), parts)


def test_without_a_yaml_the_sd_conventions_fill_in_what_shapes_cannot_tell(tmp_path):
    parts = tiny_original_parts(TINY_SD2, "v_prediction", resolution=768)
    write_original(parts, tmp_path / "v2.safetensors")
    (tmp_path / "v2.yaml").rename(tmp_path / "elsewhere.yaml")
    assert read_original(tmp_path / "v2.safetensors").diffusion.prediction_type == "epsilon"  # the default
    assert_same_parts(read_original(tmp_path / "v2.safetensors", prediction_type="v_prediction"), parts)
    assert_same_parts(read_original(tmp_path / "v2.safetensors", config=tmp_path / "elsewhere.yaml"), parts)


def test_a_stock_compvis_v2_yaml_is_read_without_importing_targets(tmp_path):
    parts = tiny_original_parts(TINY_SD2, resolution=768)
    write_original(parts, tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").unlink()
    config = tmp_path / "v2-inference-v.yaml"
    config.write_text(V2_INFERENCE_V_YAML)
    got = read_original(tmp_path / "m.safetensors", config=config)
    assert "ldm" not in sys.modules
    assert got.diffusion == DiffusionConfig(prediction_type="v_prediction")
    assert got.autoencoder_config.latent_scale == 0.18215 and got.resolution == 768
    assert got.unet_config == parts.unet_config and got.conditioning.clip.layer == "penultimate"
    assert got.sampling == SD_SAMPLING and (got.sampling.guidance_scale, got.sampling.steps) == (7.5, 30)


V2_INFERENCE_V_YAML = """
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 64
    channels: 4
    conditioning_key: crossattn
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: 64
        attention_resolutions: [ 2 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 2
        context_dim: 64
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def test_inpainting_unet_gets_its_concat_channels_from_conv_in(tmp_path):
    parts = tiny_original_parts(TINY_SD1, in_channels=9, concat_channels=5)
    write_original(parts, tmp_path / "inpaint.safetensors")
    (tmp_path / "inpaint.yaml").unlink()
    got = read_original(tmp_path / "inpaint.safetensors")
    assert (got.unet_config.in_channels, got.unet_config.concat_channels) == (9, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_their_dtype(tmp_path, dtype):
    write_original(tiny_original_parts(TINY_SD1).to(dtype), tmp_path / "half.safetensors")
    got = read_original(tmp_path / "half.safetensors")
    assert {v.dtype for part in (got.unet, got.autoencoder, got.text_encoder) for v in part.values()} == {dtype}
    pipe = Pipeline.from_parts(got, device="cpu")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}  # the pipeline casts to fp32


def test_training_checkpoint_nesting_and_ema_copy(tmp_path):
    parts = tiny_original_parts(TINY_SD1)
    tensors = to_original_state_dict(parts)
    ema = {k: v + 1 for k, v in parts.unet.items()}
    flat = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v  # model_ema.diffusion_modelinput_blocks00weight
            for k, v in ema.items()}
    torch.save({"state_dict": {**tensors, **flat, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(7)},
                "global_step": 1234, "epoch": 3}, tmp_path / "train.ckpt")
    live, averaged = read_original(tmp_path / "train.ckpt").unet, read_original(tmp_path / "train.ckpt", ema=True).unet
    assert all(torch.equal(live[k], parts.unet[k]) and torch.equal(averaged[k], ema[k]) for k in ema)


def test_ema_request_on_a_pruned_file_is_a_clear_error(tmp_path):
    write_original(tiny_original_parts(TINY_SD1), tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointError, match=r"ema=True .* 0 of the \d+ EMA UNet tensors"):
        read_original(tmp_path / "pruned.safetensors", ema=True)


# --- the text encoders ----------------------------------------------------------------------------------------

class OpenClipBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTextReference(nn.Module):
    """OpenCLIP's text tower as SD 2.x's FrozenOpenCLIPEmbedder runs it: all blocks but the last, then ln_final."""

    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenClipBlock(cfg.width, cfg.heads, cfg.mlp_width)
                                                   for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.width))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, ids):
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        causal = torch.full((n, n), float("-inf")).triu(1)
        for block in self.transformer.resblocks[:-1]:
            x = block(x, causal)
        return self.ln_final(x)


def test_openclip_text_tower_matches_a_reference_implementation():
    cfg = ClipTextConfig(width=128, layers=3, heads=2, mlp_width=256, hidden_act="gelu", layer="penultimate",
                         pad_token_id=0)
    reference = randomised(OpenClipTextReference(cfg), 5)
    parts = tiny_original_parts(TINY_SD2)
    tensors = {k: v for k, v in to_original_state_dict(parts).items() if not k.startswith("cond_stage_model.")}
    tensors.update({SD2_TEXT + k: v for k, v in reference.state_dict().items()})
    got = from_original_state_dict(tensors)
    assert got.conditioning.clip == cfg
    ours = ClipTextTransformer(got.conditioning.clip).eval()
    ours.load_state_dict(got.text_encoder)
    ids = torch.randint(0, cfg.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids), atol=1e-5, rtol=0)


def test_last_layer_gelu_encoder_is_written_with_an_identity_block_that_keeps_its_outputs():
    """A diffusers-style SD 2.x text encoder (23 blocks, all used) becomes OpenCLIP's 24 blocks, penultimate used."""
    clip_cfg = ClipTextConfig(width=64, layers=2, heads=1, mlp_width=128, hidden_act="gelu", layer="last",
                              pad_token_id=0)
    parts = tiny_original_parts((TINY_SD2[0], clip_cfg))
    tensors = to_original_state_dict(parts)
    for name in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        assert not tensors[f"{SD2_TEXT}transformer.resblocks.2.{name}"].any()
    got = from_original_state_dict(tensors)
    assert (got.conditioning.clip.layers, got.conditioning.clip.layer) == (3, "penultimate")
    original = ClipTextTransformer(clip_cfg).eval()
    original.load_state_dict(parts.text_encoder)
    ids = torch.randint(0, clip_cfg.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    for layer in ("penultimate", "last"):  # the extra block is an exact identity, so running it changes nothing
        read_back = ClipTextTransformer(ClipTextConfig(**{**got.conditioning.clip.__dict__, "layer": layer})).eval()
        read_back.load_state_dict(got.text_encoder)
        with torch.no_grad():
            assert torch.equal(read_back(ids), original(ids))


def test_sd1_clip_skip_model_is_written_without_its_skipped_block():
    clip_cfg = ClipTextConfig(width=64, layers=3, heads=1, mlp_width=128, layer="penultimate")
    parts = tiny_original_parts((TINY_SD1[0], clip_cfg))
    got = from_original_state_dict(to_original_state_dict(parts))
    assert (got.conditioning.clip.layers, got.conditioning.clip.layer) == (2, "last")
    original, read_back = ClipTextTransformer(clip_cfg).eval(), ClipTextTransformer(got.conditioning.clip).eval()
    original.load_state_dict(parts.text_encoder)
    read_back.load_state_dict(got.text_encoder)
    ids = torch.randint(0, clip_cfg.vocab_size, (1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(read_back(ids), original(ids))


# --- a tiny original file generates images ---------------------------------------------------------------------

def test_pipeline_generates_deterministic_images_from_an_original_file(tmp_path):
    write_original(tiny_original_parts(TINY_SD1), tmp_path / "tiny.safetensors")
    pipe = Pipeline.from_pretrained(tmp_path / "tiny.safetensors", device="cpu")
    assert pipe.config.sampling.sampler == "dpmpp_2m"

    def draw(seed):
        return pipe.generate_tensors("a red square", steps=3, seed=seed, height=32, width=32, progress=False)

    first = draw(0)
    assert first.shape == (1, 3, 32, 32)
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))


# --- diffusers' own single-file loader reads our files ----------------------------------------------------------

def write_diffusers_configs(parts: ModelParts, folder) -> None:
    """Config files (no weights) of a diffusers StableDiffusionPipeline folder for tiny SD 1.x-like `parts`."""
    from transformers import CLIPTextConfig

    from latent_diffusion.conditioning.tokenizer import ClipTokenizer

    u, a, c = parts.unet_config, parts.autoencoder_config, parts.conditioning.clip
    attention = [2**level in u.attention_resolutions for level in range(len(u.channel_mult))]
    heads = u.num_heads if u.num_head_channels == -1 else [u.model_channels * m // u.num_head_channels
                                                           for m in u.channel_mult]
    configs = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                             "safety_checker": [None, None], "requires_safety_checker": False,
                             "scheduler": ["diffusers", "DDIMScheduler"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": u.in_channels,
                             "out_channels": u.out_channels, "layers_per_block": u.num_res_blocks,
                             "block_out_channels": [u.model_channels * m for m in u.channel_mult],
                             "down_block_types": ["CrossAttnDownBlock2D" if a_ else "DownBlock2D" for a_ in attention],
                             "up_block_types": ["CrossAttnUpBlock2D" if a_ else "UpBlock2D" for a_ in attention[::-1]],
                             "cross_attention_dim": u.context_dim, "attention_head_dim": heads,
                             "transformer_layers_per_block": u.transformer_depth,
                             "use_linear_projection": u.use_linear_in_transformer},
        "vae/config.json": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                            "down_block_types": ["DownEncoderBlock2D"] * len(a.ch_mult),
                            "up_block_types": ["UpDecoderBlock2D"] * len(a.ch_mult),
                            "block_out_channels": [a.ch * m for m in a.ch_mult], "layers_per_block": a.num_res_blocks,
                            "latent_channels": a.z_channels, "sample_size": 32, "scaling_factor": a.latent_scale},
        "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                            "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                                            "set_alpha_to_one": False, "clip_sample": False},
    }
    for name, config in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                   num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=c.max_positions,
                   hidden_act=c.hidden_act, eos_token_id=c.eos_token_id).save_pretrained(folder / "text_encoder")
    ClipTokenizer.from_bpe_file().save_folder(folder / "tokenizer")


def test_diffusers_from_single_file_reads_our_checkpoint(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    parts = tiny_original_parts(TINY_SD1)
    write_original(parts, tmp_path / "tiny.safetensors")
    write_diffusers_configs(parts, tmp_path / "config")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "tiny.safetensors"), config=str(tmp_path / "config"), local_files_only=True)
    ours = Pipeline.from_parts(parts, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    t, ids = torch.tensor([10, 500]), torch.randint(0, 49408, (2, 77), generator=gen)
    with torch.no_grad():
        context = ours.conditioner.encoder.transformer(ids)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, context, atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample,
                                   ours.unet(x, t, context), atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.vae.decode(z).sample, ours.autoencoder.decode(z), atol=1e-5, rtol=0)


def test_diffusers_from_single_file_reads_our_sd2_layout(tmp_path):
    """diffusers runs every block of the text encoder it loads; its penultimate states + final LayerNorm are ours."""
    diffusers = pytest.importorskip("diffusers")
    parts = tiny_original_parts(TINY_SD2, "v_prediction", resolution=768)
    write_original(parts, tmp_path / "tiny2.safetensors")
    write_diffusers_configs(parts, tmp_path / "config")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "tiny2.safetensors"), config=str(tmp_path / "config"), local_files_only=True)
    ours = Pipeline.from_parts(parts, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x, t, ids = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900]), torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        context = ours.conditioner.encoder.transformer(ids)
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        final_norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm  # any version
        torch.testing.assert_close(final_norm(states), context, atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample, ours.unet(x, t, context),
                                   atol=1e-5, rtol=0)


# --- files we cannot read say why ----------------------------------------------------------------------------

class Payload:
    """A pickle that runs a shell command when loaded by an unsafe unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickle_with_a_code_payload_is_refused_and_never_runs(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))  # the payload is live: plain pickle runs it
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": to_original_state_dict(tiny_original_parts(TINY_SD1)), "callback": Payload(marker)},
               tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.ckpt.*system"):
        read_original(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("name, keep", [("cut.safetensors", 5), ("cut.safetensors", 0.5), ("cut.ckpt", 0.5)],
                         ids=["safetensors-header", "safetensors-half", "zip-half"])
def test_truncated_files_are_reported_by_name(tmp_path, name, keep):
    path = tmp_path / name
    write_original(tiny_original_parts(TINY_SD1), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut\."):
        read_original(path)


def save_tensors(path, names_and_shapes: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(shape) for k, shape in names_and_shapes.items()}, str(path))
    return path


def test_incomplete_sdxl_and_other_vector_conditioned_files_are_named_as_such(tmp_path):
    path = save_tensors(tmp_path / "xl.safetensors", {
        UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280)})
    with pytest.raises(CheckpointError, match="is an SDXL file .*lacking the autoencoder"):
        read_original(path)
    path = save_tensors(tmp_path / "unclip.safetensors", {UNET + "label_emb.0.0.weight": (1280, 2048)})
    with pytest.raises(CheckpointError, match="vector-conditioned UNet .*without SDXL's text encoders"):
        read_original(path)


def test_another_architecture_lists_the_prefixes_it_found(tmp_path):
    path = save_tensors(tmp_path / "diffusers_unet.safetensors", {
        "down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3), "down_blocks.0.resnets.0.conv1.bias": (4,),
        "conv_in.weight": (4, 4, 3, 3)})
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion checkpoint.*down_blocks\.0\.\* \(2 keys\)"):
        read_original(path)


@pytest.mark.parametrize("dropped, named", [(VAE, r"the autoencoder \(first_stage_model\.\*\)"),
                                            ("cond_stage_model.", "the text encoder")])
def test_a_missing_part_is_named(tmp_path, dropped, named):
    tensors = to_original_state_dict(tiny_original_parts(TINY_SD1))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(dropped)}
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=f"lacks {named}"):
        read_original(tmp_path / "partial.safetensors")


def test_a_yaml_that_contradicts_the_checkpoint_is_an_error(tmp_path):
    write_original(tiny_original_parts(TINY_SD1), tmp_path / "m.safetensors")
    (tmp_path / "v2.yaml").write_text(V2_INFERENCE_V_YAML)
    with pytest.raises(CheckpointError, match="FrozenOpenCLIPEmbedder but the checkpoint holds a CLIP"):
        read_original(tmp_path / "m.safetensors", config=tmp_path / "v2.yaml")


def test_models_the_format_cannot_describe_are_refused_before_writing(tmp_path):
    parts = tiny_original_parts(TINY_SD1)
    parts.conditioning = ConditioningConfig(encoder="clip", clip=ClipTextConfig(width=64, layers=2, heads=2,
                                                                                mlp_width=128))
    with pytest.raises(CheckpointError, match="heads = 2 .expected 1"):
        write_original(parts, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_load_original_state_dict_unwraps_nested_state_dicts(tmp_path):
    torch.save({"state_dict": {"state_dict": {"a": torch.ones(2)}, "global_step": 3}}, tmp_path / "n.ckpt")
    assert load_original_state_dict(tmp_path / "n.ckpt").keys() == {"a"}


@pytest.mark.parametrize("with_yaml", [True, False])
def test_a_model_on_a_vq_first_stage_round_trips_as_compvis_lays_it_out(tmp_path, with_yaml):
    """The LDM release's VQ-based models (`first_stage_model.quantize.embedding.weight`, VQModelInterface in the
    YAML): the VQ first stage is read from its shapes, with or without the YAML, and written back the same."""
    from dataclasses import replace

    from latent_diffusion.autoencoder import VQAutoencoder

    parts = tiny_original_parts(TINY_SD1)
    vq = replace(parts.autoencoder_config, regularizer="vq", n_embed=64, z_channels=3, embed_dim=3)
    unet = replace(parts.unet_config, in_channels=3, out_channels=3)
    parts = replace(parts, autoencoder_config=vq, autoencoder=randomised(VQAutoencoder(vq), 5).state_dict(),
                    unet_config=unet, unet=randomised(UNetModel(unet), 6).state_dict())
    save_model(parts, tmp_path / "vq.safetensors", "original")
    written = load_original_state_dict(tmp_path / "vq.safetensors")
    assert written["first_stage_model.quantize.embedding.weight"].shape == (64, 3)
    assert "VQModelInterface" in (tmp_path / "vq.yaml").read_text() and "double_z: false" in (
        tmp_path / "vq.yaml").read_text()
    if not with_yaml:
        (tmp_path / "vq.yaml").unlink()
    loaded = load_model(tmp_path / "vq.safetensors")
    assert loaded.autoencoder_config == vq or not with_yaml
    assert loaded.autoencoder_config.regularizer == "vq" and loaded.autoencoder_config.n_embed == 64
    assert all(torch.equal(loaded.autoencoder[k], v) for k, v in parts.autoencoder.items())
    image = Pipeline.from_parts(loaded, device="cpu").generate_tensors("a cat", steps=2, height=64, width=64,
                                                                       progress=False)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
