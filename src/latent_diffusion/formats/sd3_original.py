"""SD3 single files (Stability's layout; see `formats/sd3.py`) ↔ `ModelParts`.

What the file's shapes do not say is read from its safetensors metadata when we wrote it (`ldm.*`: heads, latent
scale and shift, GroupNorm groups, the text encoders' configs), else SD3's values (64-wide heads, 1.5305 and 0.0609,
32 groups, CLIP ViT-L, OpenCLIP bigG and T5 v1.1's conventions).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from latent_diffusion.autoencoder import build_autoencoder
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.conditioning.sd3 import CLIP_NAMES, SD3Tokenizers, split_weights
from latent_diffusion.conditioning.t5 import EMBED_TOKENS, T5Tokenizer, t5_weights
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ClipTextConfig, ConfigError, from_dict, to_dict
from latent_diffusion.files.weights import CheckpointError, save_weights
from latent_diffusion.formats import sd3
from latent_diffusion.formats.keymaps import check_shapes
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.openclip_keys import infer_clip_config
from latent_diffusion.formats.original_format import (SD_NORM_GROUPS, SD_VAE_RESOLUTION, UNET_PREFIX, VAE_PREFIX,
                                                      infer_autoencoder_config)
from latent_diffusion.formats.sdxl import PROJECTION

MARKER = UNET_PREFIX + "joint_blocks."
TEXT_PREFIX = "text_encoders."
META = "ldm."  # our metadata keys


def is_sd3(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(MARKER) for k in state_dict)


def _part(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def from_sd3_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], where: str,
                        t5_tokenizer: Path | None) -> ModelParts:
    """`ModelParts` of an SD3 single file's tensors (its text encoders must be in it)."""
    meta = {k[len(META):]: v for k, v in metadata.items() if k.startswith(META)}
    unet = _part(state_dict, UNET_PREFIX)
    mmdit_cfg = sd3.infer_mmdit_config(unet, int(meta["num_heads"]) if "num_heads" in meta else None, where)
    vae = _part(state_dict, VAE_PREFIX)
    if not vae:
        raise CheckpointError(f"{where}: the autoencoder ({VAE_PREFIX}*) is missing")
    ae_cfg = infer_autoencoder_config(vae, {}, float(meta.get("latent_scale", sd3.SD3_LATENT_SCALE)),
                                      float(meta.get("latent_shift", sd3.SD3_LATENT_SHIFT)),
                                      int(meta.get("norm_groups", SD_NORM_GROUPS)))
    check_shapes(build_autoencoder, ae_cfg, vae, f"{where}: the autoencoder ({VAE_PREFIX}*)")
    texts = {name: _part(state_dict, TEXT_PREFIX + prefix.removeprefix(TEXT_PREFIX))
             for name, prefix in sd3.SINGLE_FILE_TEXT.items()}
    missing = [sd3.SINGLE_FILE_TEXT[name] for name in CLIP_NAMES if not texts[name]]
    if missing:
        raise CheckpointError(f"{where} holds no {' or '.join(m + '*' for m in missing)}: an SD3 file without its "
                              "CLIP text encoders cannot generate (use the file that includes them, e.g. "
                              "sd3_medium_incl_clips*.safetensors, or a diffusers SD3 folder)")
    configs = {}
    for name in CLIP_NAMES:
        ours = {k.removeprefix("text_model."): v for k, v in texts[name].items()}
        ours.pop("embeddings.position_ids", None)
        if name == "clip" and PROJECTION not in ours:
            ours = sd3.clip_l_projection(ours, ours["final_layer_norm.weight"].shape[0])
        if PROJECTION not in ours:
            raise CheckpointError(f"{where}: {sd3.SINGLE_FILE_TEXT[name]}{PROJECTION} is missing (SD3's pooled text)")
        if name in meta:  # written by us: the whole config
            configs[name] = from_dict(ClipTextConfig, json.loads(meta[name]), name)
        else:  # CLIP ViT-L (quick GELU, padding with the end token) and OpenCLIP bigG (GELU, padding with "!")
            inferred = infer_clip_config({k: v for k, v in ours.items() if k != PROJECTION},
                                         openclip=name == "clip_2", layer="last")
            configs[name] = dataclasses.replace(inferred, projection_dim=ours[PROJECTION].shape[0])
        texts[name] = ours
    t5_config = None
    if texts["t5"]:
        t5_config = json.loads(meta["t5"]) if "t5" in meta else _infer_t5_config(texts["t5"])
    if t5_config is not None and t5_tokenizer is None:
        raise CheckpointError(f"{where} holds a T5 encoder, whose tokenizer is not in the file: put a diffusers SD3 "
                              "folder's tokenizer_3/ beside it, or pass t5_tokenizer= a folder with T5's "
                              "tokenizer.json")
    conditioning = sd3.sd3_conditioning(configs["clip"], configs["clip_2"], t5_config)
    text_encoder = {}
    for name in CLIP_NAMES:
        full = dataclasses.replace(getattr(conditioning, name), layer="last", final_norm=True)
        check_shapes(ClipTextTransformer, full, texts[name], f"{where}: {sd3.SINGLE_FILE_TEXT[name]}*")
        text_encoder.update({f"{name}.{k}": v for k, v in texts[name].items()})
    if t5_config is not None:
        text_encoder.update({f"t5.{k}": v for k, v in t5_weights(texts["t5"], f"{where}: T5").items()})
    tokenizers = SD3Tokenizers(ClipTokenizer.from_bpe_file(), None if t5_config is None  # the bundled CLIP vocabulary
                               else T5Tokenizer.from_folder(t5_tokenizer, conditioning.t5_max_length))
    return ModelParts(unet_config=mmdit_cfg, unet=unet, autoencoder_config=ae_cfg, autoencoder=vae,
                      conditioning=conditioning, diffusion=sd3.SD3_DIFFUSION, text_encoder=text_encoder,
                      tokenizer=tokenizers, resolution=int(meta.get("resolution", sd3.SD3_RESOLUTION)),
                      sampling=sd3.SD3_SAMPLING)


def _infer_t5_config(tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """T5 v1.1's encoder config (gated GELU) from its weights' shapes: heads from the relative attention bias."""
    shared = tensors.get("shared.weight", tensors.get(EMBED_TOKENS))
    bias = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (buckets, heads)
    q = tensors["encoder.block.0.layer.0.SelfAttention.q.weight"]  # (heads · d_kv, d_model)
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.block."))
    return {"vocab_size": shared.shape[0], "d_model": shared.shape[1], "d_kv": q.shape[0] // bias.shape[1],
            "d_ff": tensors["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0], "num_layers": layers,
            "num_heads": bias.shape[1], "relative_attention_num_buckets": bias.shape[0],
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False}


def to_sd3_state_dict(parts: ModelParts) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an SD3 single file holding `parts`, text encoders included."""
    if parts.text_encoder is None:
        raise ConfigError("an SD3 single file holds its text encoders: this model has them only at "
                          f"conditioning.path = {parts.conditioning.path}")
    check_shapes(build_autoencoder, parts.autoencoder_config, parts.autoencoder, "autoencoder weights")
    out = {UNET_PREFIX + k: v for k, v in parts.unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in parts.autoencoder.items()})
    for name, tensors in split_weights(parts.text_encoder, "SD3 text encoder weights").items():
        prefix = sd3.SINGLE_FILE_TEXT[name]
        if name in CLIP_NAMES:
            width = getattr(parts.conditioning, name).width
            projection = tensors.get(PROJECTION)
            if (name == "clip" and projection is not None and not projection.is_meta
                    and torch.equal(projection.cpu(), torch.eye(width, dtype=projection.dtype))):
                tensors = {k: v for k, v in tensors.items() if k != PROJECTION}  # SD3's files leave the identity out
            out.update({prefix + (k if k == PROJECTION else f"text_model.{k}"): v for k, v in tensors.items()})
        else:
            out.update({prefix + k: v for k, v in tensors.items()})
    a, m = parts.autoencoder_config, parts.unet_config
    metadata = {f"{META}num_heads": str(m.num_heads), f"{META}latent_scale": repr(a.latent_scale),
                f"{META}latent_shift": repr(a.latent_shift), f"{META}norm_groups": str(a.norm_groups),
                f"{META}resolution": str(parts.resolution)}
    for name in CLIP_NAMES:
        full = dataclasses.replace(getattr(parts.conditioning, name), layer="last", final_norm=True)
        metadata[META + name] = json.dumps(to_dict(full))
    if parts.conditioning.t5 is not None:
        metadata[META + "t5"] = json.dumps(parts.conditioning.t5)
    return out, metadata


def write_sd3_original(parts: ModelParts, path: Path) -> None:
    """`parts` as an SD3 .safetensors single file, with T5's tokenizer in `tokenizer_3/` beside it."""
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: an SD3 single file is written as .safetensors")
    if parts.autoencoder_config.resolution != SD_VAE_RESOLUTION and parts.autoencoder_config.attn_resolutions:
        raise CheckpointError("autoencoder attention at attn_resolutions needs the CompVis resolution "
                              f"{SD_VAE_RESOLUTION} in an SD3 single file")
    tensors, metadata = to_sd3_state_dict(parts)
    save_weights(tensors, path, metadata=metadata)
    if parts.conditioning.t5 is not None:
        if not isinstance(parts.tokenizer, SD3Tokenizers) or parts.tokenizer.t5 is None:
            raise ConfigError("this SD3 model has no T5 tokenizer to write beside the file")
        parts.tokenizer.t5.save_folder(path.parent / sd3.DIFFUSERS_TEXT["t5"][1])
