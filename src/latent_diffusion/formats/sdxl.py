"""SDXL base and refiner files ↔ `ModelParts`: what differs from SD 1.x/2.x files is the text side (two encoders,
the pooled projection, micro-conditioning); the UNet, autoencoder and scheduler go through the same maps.

- **original** (Stability's `sgm` single file): `model.diffusion_model.*` (our UNet names, `label_emb.0.*` the
  vector condition's MLP), `first_stage_model.*`, and `conditioner.embedders.N.*`: the base holds CLIP ViT-L in
  transformers' names (`embedders.0.transformer.text_model.*`) and OpenCLIP ViT-bigG (`embedders.1.model.*`,
  q/k/v fused, `text_projection` of shape (width, projection) applied as `x @ P`); the refiner holds bigG alone
  (`embedders.0.model.*`). The architecture is read off the shapes; head widths and the latent scale from an
  sgm YAML beside the file (`network_config.params`, `scale_factor`), else SDXL's 64 and 0.13025.
- **diffusers**: `text_encoder/` (`CLIPTextModel`, absent from the refiner), `text_encoder_2/`
  (`CLIPTextModelWithProjection`), `tokenizer/`, `tokenizer_2/` (one vocabulary; the second pads with "!").

In `ModelParts.text_encoder` the two encoders are one dict: `clip.*` and `clip_2.*` (`conditioning.sdxl`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.conditioning.base import split_prefixed
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.conditioning.sdxl import ENCODER_NAMES, FOURIER_DIM, MICRO_NUMBERS
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ClipTextConfig, ConditioningConfig, ConfigError, SamplingConfig, UNetConfig
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.keymaps import check_shapes, clip_state_from_transformers
from latent_diffusion.formats.openclip_keys import clip_to_openclip, infer_clip_config, openclip_to_clip

SDXL_LATENT_SCALE = 0.13025
SDXL_RESOLUTION = 1024
SDXL_HEAD_CHANNELS = 64
# diffusers' SDXL scheduler: Euler, 'leading' spacing with offset 1; its pipelines' guidance default 5
SDXL_SAMPLING = SamplingConfig(sampler="euler", steps=30, guidance_scale=5.0, timestep_spacing="leading",
                               steps_offset=1)
SDXL_PIPELINES = {"size": "StableDiffusionXLPipeline", "aesthetic": "StableDiffusionXLImg2ImgPipeline"}
EMBEDDERS = "conditioner.embedders."
# each encoder's diffusers folders and transformers class
DIFFUSERS_PARTS = {"clip": ("text_encoder", "tokenizer", "CLIPTextModel"),
                   "clip_2": ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")}
PROJECTION = "text_projection.weight"
_CLIP_EMBEDDER = "FrozenCLIPEmbedder"
_OPENCLIP_EMBEDDER = "FrozenOpenCLIPEmbedder2"


def sdxl_clip(cfg: ClipTextConfig) -> ClipTextConfig:
    """An encoder as SDXL reads it: the penultimate layer's states, no final LayerNorm (the pooled output still
    comes from the last layer, normed)."""
    return dataclasses.replace(cfg, layer="penultimate", final_norm=False)


def micro_kind(unet: UNetConfig, pooled_dim: int, where: str) -> str:
    """"size" or "aesthetic": what the UNet's vector width leaves after the pooled text (6 or 5 numbers)."""
    for kind, numbers in MICRO_NUMBERS.items():
        if unet.adm_in_channels == pooled_dim + numbers * FOURIER_DIM:
            return kind
    raise CheckpointError(f"{where}: the UNet's vector condition is {unet.adm_in_channels} wide; SDXL's is the pooled "
                          f"text ({pooled_dim}) + 6 × {FOURIER_DIM} (base) or 5 × {FOURIER_DIM} (refiner)")


def sdxl_conditioning(clip: ClipTextConfig | None, clip_2: ClipTextConfig, unet: UNetConfig,
                      where: str) -> ConditioningConfig:
    """The conditioning of an SDXL model with these (full-depth) encoder configs."""
    return ConditioningConfig(encoder="sdxl", clip=None if clip is None else sdxl_clip(clip), clip_2=sdxl_clip(clip_2),
                              micro_conditioning=micro_kind(unet, clip_2.projection_dim, where))


def split_encoders(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"clip": ..., "clip_2": ...} of `ModelParts.text_encoder`'s prefixed weights (present encoders only)."""
    return split_prefixed(tensors, ENCODER_NAMES, "SDXL text encoder weights")


def joined(encoders: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, tensors in encoders.items() for k, v in tensors.items()}


def check_encoders(conditioning: ConditioningConfig, encoders: dict[str, dict[str, torch.Tensor]], what: str) -> None:
    """Names and shapes of each encoder's weights against its config."""
    for name in ENCODER_NAMES:
        cfg = getattr(conditioning, name)
        if (cfg is None) != (name not in encoders):
            raise CheckpointError(f"{what}: the {name} text encoder is {'missing' if cfg else 'unexpected'}")
        if cfg is not None:
            check_shapes(ClipTextTransformer, cfg, encoders[name], f"{what} ({name})")


# --- original (sgm) single files ---------------------------------------------------------------------------------

def is_sdxl(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(EMBEDDERS) for k in state_dict)


def embedders_to_ours(state_dict: dict[str, torch.Tensor], where: str
                      ) -> tuple[dict[str, ClipTextConfig], dict[str, dict[str, torch.Tensor]]]:
    """(configs, our-named weights) of the `conditioner.embedders.N.*` text encoders: CLIP ViT-L first, the
    projected OpenCLIP encoder last (the base holds both, the refiner the second)."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(EMBEDDERS):
            index, _, rest = key[len(EMBEDDERS):].partition(".")
            groups.setdefault(int(index), {})[rest] = value
    configs, weights = {}, {}
    for index in sorted(groups):
        tensors = groups[index]
        if any(k.startswith("transformer.") for k in tensors):  # CLIP ViT-L, transformers' names
            ours = {k.removeprefix("transformer.").removeprefix("text_model."): v for k, v in tensors.items()}
            ours.pop("embeddings.position_ids", None)
            configs["clip"], weights["clip"] = infer_clip_config(ours, openclip=False), ours
        elif any(k.startswith("model.") for k in tensors):  # OpenCLIP ViT-bigG with its projection
            tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
            projection = tensors.pop("text_projection", None)
            if projection is None:
                raise CheckpointError(f"{where}: {EMBEDDERS}{index}.model.text_projection is missing (SDXL's pooled "
                                      "text embedding)")
            ours = openclip_to_clip(tensors)
            ours[PROJECTION] = projection.t().contiguous()
            configs["clip_2"] = dataclasses.replace(infer_clip_config(ours, openclip=True),
                                                    projection_dim=projection.shape[1])
            weights["clip_2"] = ours
        else:
            raise CheckpointError(f"{where}: {EMBEDDERS}{index}.* is neither a CLIP (transformer.*) nor an OpenCLIP "
                                  f"(model.*) text encoder; keys: {sorted(tensors)[:4]}")
    if list(configs)[-1:] != ["clip_2"]:
        raise CheckpointError(f"{where}: SDXL's last text encoder is OpenCLIP ViT-bigG with its projection "
                              f"({EMBEDDERS}N.model.*); found {', '.join(configs) or 'none'}")
    return configs, weights


def encoders_to_embedders(conditioning: ConditioningConfig, tensors: dict[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """`conditioner.embedders.N.*` tensors of our SDXL text encoders (the inverse of `embedders_to_ours`)."""
    encoders = split_encoders(tensors)
    check_encoders(conditioning, encoders, "SDXL text encoder weights")
    out, index = {}, 0
    if conditioning.clip is not None:
        clip = dict(encoders["clip"])
        clip["embeddings.position_ids"] = torch.arange(conditioning.clip.max_positions)[None]
        out.update({f"{EMBEDDERS}0.transformer.text_model.{k}": v for k, v in clip.items()})
        index = 1
    bigg = dict(encoders["clip_2"])
    projection = bigg.pop(PROJECTION)
    openclip = clip_to_openclip(bigg, conditioning.clip_2)
    openclip["text_projection"] = projection.t().contiguous()
    out.update({f"{EMBEDDERS}{index}.model.{k}": v for k, v in openclip.items()})
    return out


def embedder_targets(conditioning: ConditioningConfig) -> list[dict[str, Any]]:
    """The sgm YAML's `conditioner_config.params.emb_models` for these encoders."""
    models = []
    if conditioning.clip is not None:
        models.append({"is_trainable": False, "input_key": "txt",
                       "target": f"sgm.modules.encoders.modules.{_CLIP_EMBEDDER}",
                       "params": {"layer": "hidden", "layer_idx": conditioning.clip.layers - 1}})  # hidden_states[-2]
    models.append({"is_trainable": False, "input_key": "txt",
                   "target": f"sgm.modules.encoders.modules.{_OPENCLIP_EMBEDDER}",
                   "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                              "layer": "penultimate", "always_return_pooled": True, "legacy": False}})
    keys = (["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
            if conditioning.micro_conditioning == "size"
            else ["original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"])
    for key in keys:
        models.append({"is_trainable": False, "input_key": key,
                       "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                       "params": {"outdim": FOURIER_DIM}})
    return models


# --- diffusers folders -------------------------------------------------------------------------------------------

def is_sdxl_folder(folder: Path, index: dict[str, Any]) -> bool:
    return index.get("_class_name") in SDXL_PIPELINES.values() or (folder / "text_encoder_2").is_dir()


def transformers_names(cfg: ClipTextConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' `CLIPTextModel(WithProjection)` names of our encoder weights (the projection is top level)."""
    return {(k if k == PROJECTION else f"text_model.{k}"): v for k, v in tensors.items()}


def from_transformers(cfg: ClipTextConfig, tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Our names of `CLIPTextModel(WithProjection)` weights, checked against `cfg`."""
    tensors = dict(tensors)
    projection = tensors.pop(PROJECTION, None)
    full = dataclasses.replace(cfg, projection_dim=None)
    ours = clip_state_from_transformers(full, tensors, what)
    if (projection is None) != (cfg.projection_dim is None):
        raise CheckpointError(f"{what}: {PROJECTION} is {'missing' if projection is None else 'unexpected'}")
    if projection is not None:
        if tuple(projection.shape) != (cfg.projection_dim, cfg.width):
            raise CheckpointError(f"{what}: {PROJECTION} has shape {tuple(projection.shape)}, expected "
                                  f"{(cfg.projection_dim, cfg.width)}")
        ours[PROJECTION] = projection
    return ours


def tokenizer_for(tokenizer: ClipTokenizer, cfg: ClipTextConfig) -> ClipTokenizer:
    """The vocabulary of `tokenizer` padding as `cfg` says (SDXL's two tokenizers share one vocabulary)."""
    return ClipTokenizer(tokenizer.vocab, tokenizer.merges, cfg.max_positions, cfg.pad_token_id)


def check_same_vocabulary(first: ClipTokenizer, second: ClipTokenizer, where: str) -> None:
    if first.vocab != second.vocab or first.merges != second.merges:
        raise ConfigError(f"{where}: tokenizer/ and tokenizer_2/ have different vocabularies; SDXL's share one, and "
                          "so does this reader")
