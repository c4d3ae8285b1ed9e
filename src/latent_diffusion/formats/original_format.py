"""Stable Diffusion's original single-file checkpoints (CompVis / Stability layout) ↔ `ModelParts`.

A `.safetensors` or `.ckpt` file holds `model.diffusion_model.*` (the UNet: our key behind the prefix),
`first_stage_model.*` (the autoencoder, likewise) and the text encoder: `cond_stage_model.transformer.text_model.*`
(SD 1.x, CLIP ViT-L/14) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP ViT-H/14; see `openclip_keys`).
The architecture is read off the tensor shapes. What shapes cannot tell (prediction type, latent scale, the UNet's
head layout, the noise schedule) comes from the CompVis inference YAML (`config=`, or `<stem>.yaml` beside the
file; read with `yaml.safe_load`, no `target:` is ever imported), else from the SD 1.x / 2.x conventions.
`.ckpt` pickles are opened with `torch.load(weights_only=True)` only: a pickle that would run code is refused.
`write_original` writes the file and its YAML, so the model read back is the model written.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from latent_diffusion.autoencoder import build_autoencoder
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.conditioning.registry import conditioner_type
from latent_diffusion.conditioning.text import ClipConditioner
from latent_diffusion.conditioning.spatial import DEFAULT_NOISE_LEVEL, LOW_RES_SCHEDULE, infer_spatial
from latent_diffusion.config import (MAX_NOISE_LEVEL, AutoencoderConfig, ClipTextConfig, ConditioningConfig,
                                     ConfigError, DiffusionConfig, SamplingConfig, UNetConfig, read_yaml)
from latent_diffusion.files.atomic import atomic_path, atomic_write_bytes
from latent_diffusion.files.weights import (CheckpointError, load_module_weights, load_pickle, load_weights,
                                           place_weights, read_metadata, read_weights, save_weights)
from latent_diffusion.formats import sd3
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.openclip_keys import (OPENCLIP_PREFIX, check_writable, clip_to_openclip,
                                                   infer_clip_config, openclip_to_clip)
from latent_diffusion.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_TEXT_MODEL = "text_model."
POSITION_IDS = "embeddings.position_ids"
EMA_PREFIX = "model_ema."
SD_LATENT_SCALE = 0.18215
SD_NORM_GROUPS = 32  # CompVis hard-codes GroupNorm(32, ·) in the UNet and the autoencoder
SD_VAE_RESOLUTION = 256  # `ddconfig.resolution` of every Stable Diffusion autoencoder
SD1_UNET_HEADS = 8
SD2_UNET_HEAD_CHANNELS = 64
SD_SAMPLING = SamplingConfig(sampler="dpmpp_2m", steps=30, guidance_scale=7.5, timestep_spacing="leading",
                             steps_offset=1, set_alpha_to_one=False)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# our schedule ↔ CompVis (beta_schedule, linear_start, linear_end); CompVis "linear" is linear in √β
_SCHEDULES = {"scaled_linear": ("linear", 0.00085, 0.012), "linear": ("sqrt_linear", 1e-4, 2e-2),
              "cosine": ("cosine", 1e-4, 2e-2)}
_COMPVIS_SCHEDULE_DEFAULTS = ("linear", 1e-4, 2e-2)
_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
_OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"


def read_original(path: str | os.PathLike, config: str | os.PathLike | None = None,
                  prediction_type: str | None = None, ema: bool = False, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", t5_tokenizer: str | os.PathLike | None = None) -> ModelParts:
    """A Stable Diffusion 1.x/2.x, SDXL or SD3 checkpoint file as `ModelParts`; `ema=True` takes the UNet from
    `model_ema.*`; `t5_tokenizer` is a folder with an SD3 file's T5 tokenizer.json (default: `tokenizer_3/` beside
    the file); `dtype` and `device` as in `load_model`."""
    path = Path(path)
    used = (EMA_PREFIX if ema else UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.embedders.",
            "text_encoders.", *UNSUPPORTED_FAMILIES)
    state_dict = load_original_state_dict(path, dtype, device, keys=lambda key: key.startswith(used))
    from latent_diffusion.formats import sd3_original
    if sd3_original.is_sd3(state_dict):
        if config is not None or ema or prediction_type is not None:
            raise CheckpointError(f"{path} is an SD3 file: it takes no config, ema or prediction_type option")
        metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
        return sd3_original.from_sd3_state_dict(state_dict, metadata, str(path),
                                                sd3.t5_tokenizer_beside(path, t5_tokenizer))
    if t5_tokenizer is not None:
        raise CheckpointError(f"{path} is not an SD3 file: it takes no t5_tokenizer option")
    yaml_path = Path(config) if config is not None else path.with_suffix(".yaml")
    params = read_inference_config(yaml_path) if config is not None or yaml_path.is_file() else {}
    return from_original_state_dict(state_dict, params, prediction_type, ema, where=str(path))


def write_original(parts: ModelParts, path: str | os.PathLike) -> None:
    """Write `parts` as one checkpoint (`.safetensors`, or a `.ckpt` of plain tensors) plus `<stem>.yaml` beside it."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: expected a .safetensors or .ckpt file name for an original checkpoint")
    if parts.conditioning.encoder == "sd3":
        from latent_diffusion.formats.sd3_original import write_sd3_original
        return write_sd3_original(parts, path)
    sdxl = parts.conditioning.encoder == "sdxl"
    if sdxl:
        from latent_diffusion.formats.sdxl_original import sdxl_inference_config, to_sdxl_state_dict
    tensors = to_sdxl_state_dict(parts) if sdxl else to_original_state_dict(parts)
    if path.suffix == ".safetensors":
        save_weights(tensors, path)
    else:
        with atomic_path(path) as tmp:
            torch.save({"state_dict": {k: v.contiguous() for k, v in tensors.items()}}, tmp)
    described = sdxl_inference_config(parts) if sdxl else inference_config(parts)
    text = yaml.safe_dump(described, sort_keys=False, default_flow_style=None)
    atomic_write_bytes(path.with_suffix(".yaml"), text.encode())


def load_original_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                             device: str | torch.device = "cpu",
                             keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or `.ckpt` file (`state_dict` nesting removed); pickles load weights-only.
    Floating-point tensors are cast to `dtype` (None: as stored) and all put on `device`, one at a time; of a
    .safetensors file, only those `keys` selects are read (`read_weights`), the others stay memory-mapped."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_weights(path, dtype, device, keys)
    obj = load_pickle(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # training checkpoints: {"state_dict": {...}, "global_step": ..., ...}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    del obj  # `tensors` is now each tensor's only holder: casting one frees the stored one
    return place_weights(tensors, dtype, device)


def read_inference_config(path: str | os.PathLike) -> dict[str, Any]:
    """`model.params` of a CompVis inference YAML (the `v1-inference.yaml` layout), read with `yaml.safe_load`."""
    path = Path(path)
    data = read_yaml(path, CheckpointError)
    model = data.get("model") if isinstance(data, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected the CompVis inference layout (model: params: unet_config, "
                              f"first_stage_config, cond_stage_config ...), found {found}")
    return params


def from_original_state_dict(state_dict: dict[str, torch.Tensor], params: dict[str, Any] | None = None,
                             prediction_type: str | None = None, ema: bool = False,
                             where: str = "the checkpoint") -> ModelParts:
    """`ModelParts` of original-layout tensors; `params` is the YAML's `model.params` (empty: SD conventions)."""
    params = params or {}
    from latent_diffusion.formats import sd3_original
    if sd3_original.is_sd3(state_dict):
        return sd3_original.from_sd3_state_dict(state_dict, {}, where, None)
    if any(k.startswith("conditioner.embedders.") for k in state_dict):  # SDXL (Stability's sgm layout)
        from latent_diffusion.formats.sdxl_original import from_sdxl_state_dict
        if ema or prediction_type not in (None, "epsilon"):
            raise CheckpointError(f"{where} is an SDXL file: it takes no ema or prediction_type option")
        return from_sdxl_state_dict(state_dict, params, where)
    _check_stable_diffusion(state_dict, where)
    unet, vae = _unet_weights(state_dict, ema, where), _with_prefix(state_dict, VAE_PREFIX)
    text = _text_encoder_weights(state_dict)
    _check_complete(state_dict, unet, vae, text, where)
    openclip, text_encoder = text
    layer = _text_layer(params, openclip, where)
    ae_cfg = _infer(infer_autoencoder_config, vae, _section(params, "first_stage_config").get("ddconfig") or {},
                    float(params.get("scale_factor", SD_LATENT_SCALE)), what=f"{where}: the autoencoder")
    unet_cfg = _infer(infer_unet_config, unet, ae_cfg.embed_dim, openclip, _section(params, "unet_config"),
                      what=f"{where}: the UNet")
    clip_cfg = _infer(infer_clip_config, text_encoder, openclip, layer, what=f"{where}: the text encoder")
    _check_structure(UNetModel, unet_cfg, unet, f"{where}: UNet ({UNET_PREFIX}*)")
    _check_structure(build_autoencoder, ae_cfg, vae, f"{where}: autoencoder ({VAE_PREFIX}*)")
    _check_structure(ClipTextTransformer, clip_cfg, text_encoder, f"{where}: text encoder")
    diffusion = _diffusion_config(params, prediction_type)
    resolution = 768 if openclip and diffusion.prediction_type == "v_prediction" else 512
    spatial = infer_spatial(unet_cfg.concat_channels, ae_cfg.in_channels, ae_cfg.embed_dim)
    conditioning = ConditioningConfig(encoder="clip", clip=clip_cfg, spatial=spatial,
                                      noise_level=_noise_level(params, spatial, unet_cfg, where))
    return ModelParts(unet_config=unet_cfg, unet=unet, autoencoder_config=ae_cfg, autoencoder=vae,
                      conditioning=conditioning, diffusion=diffusion, text_encoder=text_encoder,
                      resolution=resolution, sampling=SD_SAMPLING)


def _noise_level(params: dict[str, Any], spatial: str, unet_cfg: UNetConfig, where: str) -> int | None:
    """The default noise level of an x4 upscaler (a low-resolution image and noise-level class labels: CompVis'
    `LatentUpscaleDiffusion` with `ImageConcatWithNoiseAugmentation`), None for other models."""
    if spatial != "low_res" or unet_cfg.num_classes is None:
        return None
    low = _section(params, "low_scale_config")
    schedule = low.get("noise_schedule_config") or {}
    found = (schedule.get("linear_start", LOW_RES_SCHEDULE[1]), schedule.get("linear_end", LOW_RES_SCHEDULE[2]),
             low.get("max_noise_level", MAX_NOISE_LEVEL))
    if not all(math.isclose(float(a), b, rel_tol=1e-6) for a, b in
               zip(found, (*LOW_RES_SCHEDULE[1:3], MAX_NOISE_LEVEL), strict=True)):
        raise CheckpointError(f"{where}: low_scale_config (linear_start, linear_end, max_noise_level) = {found} is "
                              f"not supported; expected the x4 upscaler's {(*LOW_RES_SCHEDULE[1:3], MAX_NOISE_LEVEL)}")
    return DEFAULT_NOISE_LEVEL


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _describe_prefixes(keys, limit: int = 5) -> str:
    counts = Counter(".".join(k.split(".")[:2]) + ".*" if k.count(".") >= 2 else k for k in keys)
    shown = ", ".join(f"{p} ({n} keys)" for p, n in counts.most_common(limit))
    more = f" and {len(counts) - limit} more" if len(counts) > limit else ""
    return f"{shown}{more}" if counts else "no tensors"


# Families we do not load, told apart by a key only they have (their weights would otherwise fail as "not SD")
UNSUPPORTED_FAMILIES = {"model.diffusion_model.double_blocks.": "FLUX", "double_blocks.": "FLUX",
                        "model.diffusion_model.x_embedder.": "a diffusion transformer (DiT / PixArt)"}


def _check_stable_diffusion(state_dict: dict[str, torch.Tensor], where: str) -> None:
    for marker, family in UNSUPPORTED_FAMILIES.items():
        if any(k.startswith(marker) for k in state_dict):
            raise CheckpointError(f"{where} is a {family} checkpoint ({marker}*): this family is not supported; "
                                  "supported: Stable Diffusion 1.x, 2.x, SDXL and SD3")
    adm = state_dict.get(UNET_PREFIX + "label_emb.0.0.weight")
    if adm is not None:
        raise CheckpointError(f"{where} holds a vector-conditioned UNet ({UNET_PREFIX}label_emb.0.0.weight "
                              f"{tuple(adm.shape)}) without SDXL's text encoders (conditioner.embedders.*): a "
                              "family that is not supported (e.g. unCLIP, Stable Diffusion 2.1 unclip); supported: "
                              "Stable Diffusion 1.x, 2.x and SDXL")
    if not any(k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", EMA_PREFIX)) for k in state_dict):
        raise CheckpointError(f"{where} is not a Stable Diffusion checkpoint: expected keys under {UNET_PREFIX}*, "
                              f"{VAE_PREFIX}* and cond_stage_model.*; found {_describe_prefixes(state_dict)}")


def _unet_weights(state_dict: dict[str, torch.Tensor], ema: bool, where: str) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*`, or with `ema` the same tensors from CompVis' flattened `model_ema.<name, no dots>`."""
    unet = _with_prefix(state_dict, UNET_PREFIX)
    if not ema or not unet:
        return unet
    flat = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in unet}
    found = sum(name in state_dict for name in flat.values())
    if found < len(flat):
        raise CheckpointError(f"{where}: ema=True but the file holds {found} of the {len(flat)} EMA UNet tensors "
                              f"({EMA_PREFIX}diffusion_model...; e.g. {next(iter(flat.values()))}); pruned and "
                              f"EMA-only files already keep the weights to use under {UNET_PREFIX}*: load without ema")
    return {k: state_dict[name] for k, name in flat.items()}


def _text_encoder_weights(state_dict: dict[str, torch.Tensor]) -> tuple[bool, dict[str, torch.Tensor]] | None:
    """(is OpenCLIP, our-named weights) of the text encoder, or None when the file has neither kind."""
    openclip = _with_prefix(state_dict, OPENCLIP_PREFIX)
    if openclip:
        return True, openclip_to_clip(openclip)
    clip = {k.removeprefix(CLIP_TEXT_MODEL): v for k, v in _with_prefix(state_dict, CLIP_PREFIX).items()}
    clip.pop(POSITION_IDS, None)  # a constant arange buffer
    return (False, clip) if clip else None


def _check_complete(state_dict, unet, vae, text, where: str) -> None:
    missing = [name for name, present in (
        (f"the UNet ({UNET_PREFIX}*)", unet), (f"the autoencoder ({VAE_PREFIX}*)", vae),
        (f"the text encoder ({CLIP_PREFIX}{CLIP_TEXT_MODEL}* for SD 1.x or {OPENCLIP_PREFIX}* for SD 2.x)",
         text)) if not present]
    if missing:
        raise CheckpointError(f"{where} lacks {' and '.join(missing)}; a full Stable Diffusion checkpoint holds "
                              f"all three, this one holds {_describe_prefixes(state_dict)}")


def _section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """`params[name]['params']` of the YAML, {} when absent."""
    section = params.get(name) or {}
    inner = section.get("params") if isinstance(section, dict) else None
    return inner if isinstance(inner, dict) else {}


def _infer(infer, *args, what: str):
    """`infer(*args)`, with a missing key or an impossible config reported as a CheckpointError about `what`."""
    try:
        return infer(*args)
    except KeyError as exc:
        raise CheckpointError(f"{what} lacks {exc.args[0]!r}: not the Stable Diffusion (CompVis) layout") from exc
    except (ConfigError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{what}: the tensor shapes give no valid architecture: {exc}") from exc


def _check_structure(module_class, cfg, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Names and shapes of `tensors` against the module built from `cfg` (on the meta device: nothing allocated)."""
    with torch.device("meta"):
        module = module_class(cfg)
    load_module_weights(module, {k: v.to("meta") for k, v in tensors.items()}, what)


def _layer_index(keys, pattern: str) -> list[int]:
    return [int(m[1]) for k in keys if (m := re.fullmatch(pattern, k))]


def infer_unet_config(unet: dict[str, torch.Tensor], latent_channels: int, openclip: bool,
                      params: dict[str, Any]) -> UNetConfig:
    """The UNet's architecture from its shapes; heads from YAML `unet_config.params` or the SD 1.x / 2.x convention."""
    ch, in_channels = unet["input_blocks.0.0.weight"].shape[:2]
    downsamples = sorted(_layer_index(unet, r"input_blocks\.(\d+)\.0\.op\.weight"))
    num_res_blocks = downsamples[0] - 1 if downsamples else max(_layer_index(unet, r"input_blocks\.(\d+)\..*"))
    first = [1 + level * (num_res_blocks + 1) for level in range(len(downsamples) + 1)]  # per level
    widths = [unet[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in first]
    if any(w % ch for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of model_channels {ch}")
    attention = tuple(2**level for level in reversed(range(len(first)))
                      if f"input_blocks.{first[level]}.1.norm.weight" in unet)
    depth = _transformer_depths(unet, first)
    label = unet.get("label_emb.weight")
    adm = unet.get("label_emb.0.0.weight")  # SDXL's vector condition (CompVis `num_classes: sequential`)
    out_channels = unet["out.2.weight"].shape[0] if "out.2.weight" in unet else latent_channels  # a ControlNet: none
    return UNetConfig(in_channels=in_channels, out_channels=out_channels, model_channels=ch,
                      channel_mult=tuple(w // ch for w in widths), num_res_blocks=num_res_blocks,
                      attention_resolutions=attention, transformer_depth=depth,
                      context_dim=unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
                      use_linear_in_transformer=unet["middle_block.1.proj_in.weight"].ndim == 2,
                      num_classes=None if label is None else label.shape[0],
                      adm_in_channels=None if adm is None else adm.shape[1],
                      concat_channels=in_channels - latent_channels, dropout=float(params.get("dropout", 0.0)),
                      gradient_checkpointing=bool(params.get("use_checkpoint", False)),
                      disable_self_attentions=_self_attention_off(unet, first, widths, params),
                      **_unet_heads(openclip, params))


def _transformer_depths(unet: dict[str, torch.Tensor], first: list[int]) -> int | tuple[int, ...]:
    """Transformer blocks per level (one number where all agree), counted in each level's first spatial
    transformer; a level without attention takes the depth the others share, else 1 (as diffusers configs
    write them: the refiner's 4, the base's [1, 2, 10]); the middle block is as deep as the last level."""
    def count(prefix: str) -> int:
        return len(_layer_index(unet, prefix.replace(".", r"\.") + r"\.transformer_blocks\.(\d+)\.norm1\.weight"))

    middle = count("middle_block.1")
    depths = [count(f"input_blocks.{b}.1") or None for b in first]
    depths[-1] = depths[-1] or middle
    if depths[-1] != middle:
        raise ValueError(f"the middle block has {middle} transformer blocks, the last level {depths[-1]}: only "
                         "a middle block as deep as the last level is supported")
    shared = {d for d in depths if d is not None}
    fill = shared.pop() if len(shared) == 1 else 1
    depths = [d or fill for d in depths]
    return depths[0] if len(set(depths)) == 1 else tuple(depths)


def _self_attention_off(unet: dict[str, torch.Tensor], first: list[int], widths: list[int],
                        params: dict[str, Any]) -> tuple[bool, ...] | None:
    """`disable_self_attentions` from the YAML, else from the shapes: a level whose attn1 reads tokens of another
    width than its own reads the condition (where the widths agree only the YAML can tell: self-attention)."""
    if params.get("disable_self_attentions") is not None:
        flags = tuple(bool(f) for f in params["disable_self_attentions"])
    else:
        keys = [f"input_blocks.{b}.1.transformer_blocks.0.attn1.to_k.weight" for b in first]
        flags = tuple(k in unet and unet[k].shape[1] != w for k, w in zip(keys, widths, strict=True))
    return flags if any(flags) else None


def _unet_heads(openclip: bool, params: dict[str, Any]) -> dict[str, int]:
    if "num_heads" in params or "num_head_channels" in params:
        heads = int(params.get("num_heads", -1))
        return {"num_heads": UNetConfig.num_heads if heads == -1 else heads,
                "num_head_channels": int(params.get("num_head_channels", -1))}
    return {"num_head_channels": SD2_UNET_HEAD_CHANNELS} if openclip else {"num_heads": SD1_UNET_HEADS}


def infer_autoencoder_config(vae: dict[str, torch.Tensor], ddconfig: dict[str, Any], latent_scale: float,
                             latent_shift: float = 0.0, norm_groups: int = SD_NORM_GROUPS) -> AutoencoderConfig:
    """The autoencoder's architecture from its shapes (SD3's has no quant convs: its latents are the encoder's);
    `resolution` (placing attention) from the YAML's ddconfig."""
    ch, in_channels = vae["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(_layer_index(vae, r"encoder\.down\.(\d+)\..*"))
    num_res_blocks = 1 + max(_layer_index(vae, r"encoder\.down\.0\.block\.(\d+)\..*"))
    resolution = int(ddconfig.get("resolution", SD_VAE_RESOLUTION))
    widths = [vae[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] for level in range(levels)]
    if any(w % ch for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of ch {ch}")
    attention = tuple(resolution // 2**level for level in range(levels)
                      if f"encoder.down.{level}.attn.0.q.weight" in vae)
    codebook = vae.get("quantize.embedding.weight")  # a VQ first stage (VQModelInterface)
    vq = {} if codebook is None else {"regularizer": "vq", "n_embed": codebook.shape[0]}
    z_channels = vae["decoder.conv_in.weight"].shape[1]
    embed_dim = vae["post_quant_conv.weight"].shape[1] if "post_quant_conv.weight" in vae else z_channels
    return AutoencoderConfig(in_channels=in_channels, out_channels=vae["decoder.conv_out.weight"].shape[0], ch=ch,
                             ch_mult=tuple(w // ch for w in widths), num_res_blocks=num_res_blocks,
                             attn_resolutions=attention, dropout=float(ddconfig.get("dropout", 0.0)),
                             z_channels=z_channels, embed_dim=embed_dim, resolution=resolution,
                             latent_scale=latent_scale, latent_shift=latent_shift,
                             quant_conv="post_quant_conv.weight" in vae, norm_groups=norm_groups, **vq)


def _first_stage(a: AutoencoderConfig, ddconfig: dict[str, Any]) -> dict[str, Any]:
    """The YAML's first_stage_config: CompVis' AutoencoderKL, or its VQModelInterface for a VQ first stage."""
    params = {"embed_dim": a.embed_dim, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}
    if a.regularizer == "vq":
        return {"target": "ldm.models.autoencoder.VQModelInterface", "params": {**params, "n_embed": a.n_embed}}
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": params}


def _text_layer(params: dict[str, Any], openclip: bool, where: str) -> str | None:
    """The conditioning layer the YAML's `cond_stage_config` asks for (None: no YAML, use the SD convention)."""
    cond = params.get("cond_stage_config") or {}
    target = str(cond.get("target", "")) if isinstance(cond, dict) else ""
    if not target:
        return None
    kind = target.rsplit(".", 1)[-1]
    if kind not in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"):
        raise CheckpointError(f"{where}: unsupported cond_stage_config.target {target!r}; expected "
                              f"{_CLIP_TARGET} (SD 1.x) or {_OPENCLIP_TARGET} (SD 2.x)")
    if (kind == "FrozenOpenCLIPEmbedder") != openclip:
        held = f"an OpenCLIP ({OPENCLIP_PREFIX}*)" if openclip else f"a CLIP ({CLIP_PREFIX}*)"
        raise CheckpointError(f"{where}: the config's cond_stage_config.target is {target} but the checkpoint "
                              f"holds {held} text encoder")
    layer = (_section(params, "cond_stage_config")).get("layer", "last")
    if layer not in ("last", "penultimate") or (not openclip and layer != "last"):
        raise CheckpointError(f"{where}: cond_stage_config.params.layer = {layer!r} is not supported for {kind}; "
                              "expected 'last'" + (" or 'penultimate'" if openclip else ""))
    return layer


def _diffusion_config(params: dict[str, Any], prediction_type: str | None) -> DiffusionConfig:
    parameterization = params.get("parameterization", "eps")
    if parameterization not in _PARAMETERIZATION:
        raise CheckpointError(f"model.params.parameterization = {parameterization!r}: expected one of "
                              f"{', '.join(_PARAMETERIZATION)}")
    prediction_type = prediction_type or _PARAMETERIZATION[parameterization]
    if prediction_type not in _PARAMETERIZATION.values():
        raise ValueError(f"prediction_type = {prediction_type!r}: expected one of "
                         f"{', '.join(_PARAMETERIZATION.values())}")
    schedule, beta_range = _schedule(params)
    return DiffusionConfig(schedule=schedule, num_timesteps=int(params.get("timesteps", 1000)),
                           prediction_type=prediction_type, beta_range=beta_range)


def _schedule(params: dict[str, Any]) -> tuple[str, tuple[float, float] | None]:
    """Our schedule and β range (None: its standard one) for the YAML's beta_schedule/linear_start/linear_end (SD's
    scaled_linear when none is given)."""
    keys = ("beta_schedule", "linear_start", "linear_end")
    if not any(k in params for k in keys):
        return "scaled_linear", None
    name, start, end = (params.get(k, d) for k, d in zip(keys, _COMPVIS_SCHEDULE_DEFAULTS, strict=True))
    for ours, (theirs, our_start, our_end) in _SCHEDULES.items():
        if name == theirs:
            standard = name == "cosine" or (math.isclose(float(start), our_start, rel_tol=1e-6)
                                            and math.isclose(float(end), our_end, rel_tol=1e-6))
            return ours, None if standard else (float(start), float(end))
    raise CheckpointError(f"noise schedule beta_schedule={name!r} is not supported; expected one of: "
                          f"{', '.join(t for t, _, _ in _SCHEDULES.values())}")


def to_original_state_dict(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The original-layout tensors of `parts` (renaming and q/k/v fusing only: works on meta tensors too)."""
    _check_writable(parts)
    _check_structure(UNetModel, parts.unet_config, parts.unet, "UNet weights")
    _check_structure(build_autoencoder, parts.autoencoder_config, parts.autoencoder, "autoencoder weights")
    out = {UNET_PREFIX + k: v for k, v in parts.unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in parts.autoencoder.items()})
    out.update(_text_encoder_to_original(_own_text_encoder(parts), parts.conditioning.clip))
    return out


def _check_writable(parts: ModelParts) -> None:
    if not issubclass(conditioner_type(parts.conditioning.encoder), ClipConditioner):
        raise CheckpointError("an original checkpoint holds a CLIP text-conditioned model (Stable Diffusion "
                              f"1.x/2.x); this model's condition encoder is '{parts.conditioning.encoder}'")
    for what, groups in (("unet", parts.unet_config.norm_groups),
                         ("autoencoder", parts.autoencoder_config.norm_groups)):
        if groups != SD_NORM_GROUPS:
            raise CheckpointError(f"{what}.norm_groups = {groups}: the original format fixes GroupNorm at "
                                  f"{SD_NORM_GROUPS} groups")
    if parts.diffusion.zero_terminal_snr:
        raise CheckpointError("diffusion.zero_terminal_snr cannot be described by a CompVis inference config; "
                              "save this model in the native or diffusers format")
    check_writable(parts.conditioning.clip)


def _own_text_encoder(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The text encoder's weights (from `conditioning.path` when not in memory), our names without `text_model.`."""
    tensors = parts.text_encoder
    if tensors is None:
        tensors = load_weights(parts.conditioning.path)
        if any(k.startswith(CLIP_PREFIX) for k in tensors):
            tensors = _with_prefix(tensors, CLIP_PREFIX)
    tensors = {k.removeprefix(CLIP_TEXT_MODEL): v for k, v in tensors.items()}
    tensors.pop(POSITION_IDS, None)
    return tensors


def _text_encoder_to_original(tensors: dict[str, torch.Tensor], cfg: ClipTextConfig) -> dict[str, torch.Tensor]:
    _check_structure(ClipTextTransformer, cfg, tensors, "text encoder weights")
    if cfg.hidden_act == "gelu":
        return {OPENCLIP_PREFIX + k: v for k, v in clip_to_openclip(tensors, cfg).items()}
    if cfg.layer == "penultimate":  # SD 1.x runs every block stored: leave out the one this model skips
        skipped = f"encoder.layers.{cfg.layers - 1}."
        tensors = {k: v for k, v in tensors.items() if not k.startswith(skipped)}
    ref = tensors["embeddings.position_embedding.weight"]
    tensors[POSITION_IDS] = torch.arange(cfg.max_positions, device=ref.device)[None]  # (1, 77) as in SD 1.x files
    return {CLIP_PREFIX + CLIP_TEXT_MODEL + k: v for k, v in tensors.items()}


def inference_config(parts: ModelParts) -> dict[str, Any]:
    """The CompVis inference YAML (`v1-inference.yaml` / `v2-inference-v.yaml` layout) describing `parts`."""
    u, a, d = parts.unet_config, parts.autoencoder_config, parts.diffusion
    heads = {"num_head_channels": u.num_head_channels} if u.num_head_channels != -1 else {"num_heads": u.num_heads}
    unet = {"use_checkpoint": u.gradient_checkpointing, "image_size": 32, "in_channels": u.in_channels,
            "out_channels": u.out_channels, "model_channels": u.model_channels,
            "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
            "channel_mult": list(u.channel_mult), **heads, "use_spatial_transformer": True,
            "use_linear_in_transformer": u.use_linear_in_transformer, "transformer_depth": (u.transformer_depth if isinstance(u.transformer_depth, int)
                                                                     else list(u.transformer_depth)),
            "context_dim": u.context_dim, "dropout": u.dropout, "legacy": False}
    if u.num_classes is not None:
        unet["num_classes"] = u.num_classes
    if u.disable_self_attentions is not None:
        unet["disable_self_attentions"] = list(u.disable_self_attentions)
    ddconfig = {"double_z": a.regularizer == "kl", "z_channels": a.z_channels, "resolution": a.resolution,
                "in_channels": a.in_channels, "out_ch": a.out_channels, "ch": a.ch, "ch_mult": list(a.ch_mult),
                "num_res_blocks": a.num_res_blocks, "attn_resolutions": list(a.attn_resolutions),
                "dropout": a.dropout}
    openclip = parts.conditioning.clip.hidden_act == "gelu"
    cond = ({"target": _OPENCLIP_TARGET, "params": {"freeze": True, "layer": "penultimate"}} if openclip
            else {"target": _CLIP_TARGET})
    beta_schedule, linear_start, linear_end = _SCHEDULES[d.schedule]
    linear_start, linear_end = d.beta_range or (linear_start, linear_end)
    parameterization = {v: k for k, v in _PARAMETERIZATION.items()}[d.prediction_type]
    inpainting = u.concat_channels == 5  # mask + masked-image latents, as SD inpainting
    params = {"parameterization": parameterization, "linear_start": linear_start, "linear_end": linear_end,
              "beta_schedule": beta_schedule, "timesteps": d.num_timesteps, "first_stage_key": "jpg",
              "cond_stage_key": "txt", "image_size": parts.resolution // a.downsample_factor,
              "channels": a.embed_dim, "cond_stage_trainable": False,
              "conditioning_key": "hybrid" if u.concat_channels else "crossattn",
              "scale_factor": a.latent_scale, "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": _first_stage(a, ddconfig),
              "cond_stage_config": cond}
    target = "LatentInpaintDiffusion" if inpainting else "LatentDiffusion"
    if parts.conditioning.noise_level is not None:  # the x4 upscaler's noise-augmented low-resolution image
        target, params["conditioning_key"], params["low_scale_key"] = "LatentUpscaleDiffusion", "hybrid-adm", "lr"
        schedule = {"linear_start": LOW_RES_SCHEDULE[1], "linear_end": LOW_RES_SCHEDULE[2]}
        params["low_scale_config"] = {
            "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
            "params": {"noise_schedule_config": schedule, "max_noise_level": MAX_NOISE_LEVEL}}
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{target}", "params": params}}
