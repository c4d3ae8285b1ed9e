"""SDXL's original single files (Stability's `sgm` layout; see `formats.sdxl`) ↔ `ModelParts`, and the sgm inference
YAML written beside them. `original_format.read_original`/`write_original` hand SDXL files here."""

from __future__ import annotations

from typing import Any

import torch

from latent_diffusion.autoencoder import build_autoencoder
from latent_diffusion.config import DiffusionConfig
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats import original_format as sd
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.sdxl import (SDXL_HEAD_CHANNELS, SDXL_LATENT_SCALE, SDXL_RESOLUTION, SDXL_SAMPLING,
                                           embedder_targets, embedders_to_ours, encoders_to_embedders, joined,
                                           sdxl_conditioning)
from latent_diffusion.unet import UNetModel

ENGINE = "sgm.models.diffusion.DiffusionEngine"


def from_sdxl_state_dict(state_dict: dict[str, torch.Tensor], params: dict[str, Any],
                         where: str = "the checkpoint") -> ModelParts:
    """`ModelParts` of an SDXL base or refiner file's tensors; `params` is its sgm YAML's `model.params` ({}:
    SDXL's conventions: 64-channel heads, latent scale 0.13025)."""
    unet = {k[len(sd.UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(sd.UNET_PREFIX)}
    vae = {k[len(sd.VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(sd.VAE_PREFIX)}
    if not unet or not vae:
        missing = [name for name, part in (("the UNet", unet), ("the autoencoder", vae)) if not part]
        raise CheckpointError(f"{where} is an SDXL file (conditioner.embedders.*) lacking {' and '.join(missing)}")
    configs, encoders = embedders_to_ours(state_dict, where)
    network = sd._section(params, "network_config")
    heads = network if ("num_heads" in network or "num_head_channels" in network) else \
        {"num_head_channels": SDXL_HEAD_CHANNELS}
    ae_cfg = sd._infer(sd.infer_autoencoder_config, vae, sd._section(params, "first_stage_config").get("ddconfig")
                       or {}, float(params.get("scale_factor", SDXL_LATENT_SCALE)), what=f"{where}: the autoencoder")
    unet_cfg = sd._infer(sd.infer_unet_config, unet, ae_cfg.embed_dim, True, heads, what=f"{where}: the UNet")
    if unet_cfg.adm_in_channels is None:
        raise CheckpointError(f"{where}: an SDXL UNet has a vector condition ({sd.UNET_PREFIX}label_emb.0.0.weight)")
    sd._check_structure(UNetModel, unet_cfg, unet, f"{where}: UNet ({sd.UNET_PREFIX}*)")
    sd._check_structure(build_autoencoder, ae_cfg, vae, f"{where}: autoencoder ({sd.VAE_PREFIX}*)")
    conditioning = sdxl_conditioning(configs.get("clip"), configs["clip_2"], unet_cfg, where)
    return ModelParts(unet_config=unet_cfg, unet=unet, autoencoder_config=ae_cfg, autoencoder=vae,
                      conditioning=conditioning, diffusion=DiffusionConfig(), text_encoder=joined(encoders),
                      resolution=SDXL_RESOLUTION, sampling=SDXL_SAMPLING)


def to_sdxl_state_dict(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The sgm-layout tensors of an SDXL model (renaming, q/k/v fusing and transposing the projection only)."""
    _check_writable(parts)
    sd._check_structure(UNetModel, parts.unet_config, parts.unet, "UNet weights")
    sd._check_structure(build_autoencoder, parts.autoencoder_config, parts.autoencoder, "autoencoder weights")
    out = {sd.UNET_PREFIX + k: v for k, v in parts.unet.items()}
    out.update({sd.VAE_PREFIX + k: v for k, v in parts.autoencoder.items()})
    out.update(encoders_to_embedders(parts.conditioning, parts.text_encoder))
    return out


def _check_writable(parts: ModelParts) -> None:
    if parts.text_encoder is None:
        raise CheckpointError("an SDXL original file holds its text encoders: this model has them only at "
                              f"conditioning.path = {parts.conditioning.path}; load the model from a folder that "
                              "holds them")
    for what, groups in (("unet", parts.unet_config.norm_groups),
                         ("autoencoder", parts.autoencoder_config.norm_groups)):
        if groups != sd.SD_NORM_GROUPS:
            raise CheckpointError(f"{what}.norm_groups = {groups}: the original format fixes GroupNorm at "
                                  f"{sd.SD_NORM_GROUPS} groups")
    if parts.diffusion != DiffusionConfig(p_uncond=parts.diffusion.p_uncond,
                                          min_snr_gamma=parts.diffusion.min_snr_gamma):
        raise CheckpointError("an SDXL original file implies SDXL's noise schedule (scaled_linear, 1000 steps, ε); "
                              "save a model with another one in the native or diffusers format")


def sdxl_inference_config(parts: ModelParts) -> dict[str, Any]:
    """An sgm inference YAML (`sd_xl_base.yaml` / `sd_xl_refiner.yaml` layout) describing `parts`."""
    u, a, c = parts.unet_config, parts.autoencoder_config, parts.conditioning
    heads = {"num_head_channels": u.num_head_channels} if u.num_head_channels != -1 else {"num_heads": u.num_heads}
    depth = u.transformer_depth if isinstance(u.transformer_depth, int) else list(u.transformer_depth)
    network = {"adm_in_channels": u.adm_in_channels, "num_classes": "sequential",
               "use_checkpoint": u.gradient_checkpointing, "in_channels": u.in_channels,
               "out_channels": u.out_channels, "model_channels": u.model_channels,
               "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
               "channel_mult": list(u.channel_mult), **heads, "use_linear_in_transformer": u.use_linear_in_transformer,
               "transformer_depth": depth, "context_dim": u.context_dim, "spatial_transformer_attn_type": "softmax"}
    ddconfig = {"attn_type": "vanilla", "double_z": True, "z_channels": a.z_channels, "resolution": a.resolution,
                "in_channels": a.in_channels, "out_ch": a.out_channels, "ch": a.ch, "ch_mult": list(a.ch_mult),
                "num_res_blocks": a.num_res_blocks, "attn_resolutions": list(a.attn_resolutions),
                "dropout": a.dropout}
    params = {"scale_factor": a.latent_scale, "disable_first_stage_autocast": True,
              "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                                  "params": {"num_idx": 1000}},
              "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": network},
              "conditioner_config": {"target": "sgm.modules.GeneralConditioner",
                                     "params": {"emb_models": embedder_targets(c)}},
              "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                                     "params": {"embed_dim": a.embed_dim, "ddconfig": ddconfig,
                                                "lossconfig": {"target": "torch.nn.Identity"}}}}
    return {"model": {"target": ENGINE, "params": params}}
