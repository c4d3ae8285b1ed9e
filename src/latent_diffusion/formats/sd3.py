"""Stable Diffusion 3 files ↔ `ModelParts`: the MMDiT, the 16-channel VAE (no quant convs, latents shifted then
scaled), CLIP-L + CLIP-G + T5 text encoders, rectified flow with shift 3.

- **original** (Stability's single file): `model.diffusion_model.*` (our MMDiT names: `joint_blocks.N.*`),
  `first_stage_model.*` (the CompVis VAE layout), and optionally `text_encoders.clip_l.transformer.*`,
  `text_encoders.clip_g.transformer.*` and `text_encoders.t5xxl.transformer.*` (transformers' names; CLIP-L
  without its projection, which is the identity in SD3). The architecture is read off the shapes; heads are 64
  wide unless the file's metadata (written by us) or the q/k norms say otherwise. T5's tokenizer is not in the
  file: it is read from a `tokenizer_3/` folder beside it (a diffusers SD3 folder's), or `t5_tokenizer=`.
- **diffusers**: `transformer/` (`SD3Transformer2DModel`), `vae/`, `text_encoder/`, `text_encoder_2/`
  (`CLIPTextModelWithProjection`), `text_encoder_3/` (`T5EncoderModel`, optional), `tokenizer/`, `tokenizer_2/`,
  `tokenizer_3/`, `scheduler/` (`FlowMatchEulerDiscreteScheduler`).

`ModelParts.text_encoder` holds `clip.*`, `clip_2.*` and `t5.*` (`conditioning.sd3`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.conditioning.sd3 import CLIP_NAMES, split_weights
from latent_diffusion.conditioning.t5 import t5_weights
from latent_diffusion.config import (ClipTextConfig, ConditioningConfig, ConfigError, DiffusionConfig, MMDiTConfig,
                                     SamplingConfig)
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.keymaps import check_shapes
from latent_diffusion.formats.sdxl import PROJECTION, from_transformers, sdxl_clip, transformers_names
from latent_diffusion.mmdit import MMDiT

SD3_LATENT_SCALE, SD3_LATENT_SHIFT = 1.5305, 0.0609  # SD3's VAE (diffusers' scaling_factor, shift_factor)
SD3_HEAD_WIDTH = 64
SD3_RESOLUTION = 1024
SD3_DIFFUSION = DiffusionConfig(objective="flow", flow_shift=3.0)
SD3_SAMPLING = SamplingConfig(sampler="flow_euler", steps=28, guidance_scale=7.0)  # diffusers' pipeline defaults
SD3_PIPELINE = "StableDiffusion3Pipeline"
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": "flow_euler", "FlowMatchHeunDiscreteScheduler": "flow_heun"}
# diffusers folders of each text encoder: (weights, tokenizer, transformers class)
DIFFUSERS_TEXT = {"clip": ("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
                  "clip_2": ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
                  "t5": ("text_encoder_3", "tokenizer_3", "T5EncoderModel")}
SINGLE_FILE_TEXT = {"clip": "text_encoders.clip_l.transformer.", "clip_2": "text_encoders.clip_g.transformer.",
                    "t5": "text_encoders.t5xxl.transformer."}


# --- the MMDiT: our (Stability's) names ↔ diffusers' SD3Transformer2DModel -------------------------------------

def _mmdit_rules(cfg: MMDiTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(our key, diffusers keys, how) for every weight: "same", "qkv" (one fused tensor ↔ q, k, v) or "swap"
    (adaLN's (shift, scale) ↔ diffusers' AdaLayerNormContinuous (scale, shift))."""
    rules: list[tuple[str, tuple[str, ...], str]] = []

    def linear(ours: str, theirs: str, how: str = "same") -> None:
        for param in ("weight", "bias"):
            if how == "qkv":
                rules.append((f"{ours}.{param}", tuple(f"{t}.{param}" for t in theirs), how))
            else:
                rules.append((f"{ours}.{param}", (f"{theirs}.{param}",), how))

    rules.append(("pos_embed", ("pos_embed.pos_embed",), "same"))
    linear("x_embedder.proj", "pos_embed.proj")
    linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    if cfg.adm_in_channels is not None:
        linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
        linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    linear("context_embedder", "context_embedder")
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == cfg.depth - 1
        for stream, attn, q_names, out, norms, ff, ada in (
                ("x_block", "attn", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k"), "ff", "norm1"),
                ("context_block", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                 ("norm_added_q", "norm_added_k"), "ff_context", "norm1_context")):
            last = pre_only and stream == "context_block"
            linear(f"{ours}.{stream}.attn.qkv", tuple(f"{theirs}.{attn}.{q}" for q in q_names), "qkv")
            if not last:
                linear(f"{ours}.{stream}.attn.proj", f"{theirs}.{attn}.{out}")
                linear(f"{ours}.{stream}.mlp.fc1", f"{theirs}.{ff}.net.0.proj")
                linear(f"{ours}.{stream}.mlp.fc2", f"{theirs}.{ff}.net.2")
            if cfg.qk_norm:
                for ln, norm in zip(("ln_q", "ln_k"), norms, strict=True):
                    rules.append((f"{ours}.{stream}.attn.{ln}.weight", (f"{theirs}.{attn}.{norm}.weight",), "same"))
            linear(f"{ours}.{stream}.adaLN_modulation.1", f"{theirs}.{ada}.linear", "swap" if last else "same")
        if i in cfg.dual_attention_layers:
            linear(f"{ours}.x_block.attn2.qkv", tuple(f"{theirs}.attn2.{q}" for q in ("to_q", "to_k", "to_v")), "qkv")
            linear(f"{ours}.x_block.attn2.proj", f"{theirs}.attn2.to_out.0")
            if cfg.qk_norm:
                rules.append((f"{ours}.x_block.attn2.ln_q.weight", (f"{theirs}.attn2.norm_q.weight",), "same"))
                rules.append((f"{ours}.x_block.attn2.ln_k.weight", (f"{theirs}.attn2.norm_k.weight",), "same"))
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return rules


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_state_to_diffusers(cfg: MMDiTConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MMDiT weights → `SD3Transformer2DModel` weights."""
    check_shapes(MMDiT, cfg, tensors, "MMDiT weights")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _mmdit_rules(cfg):
        value = tensors[ours]
        if how == "qkv":
            out.update(zip(theirs, (part.contiguous() for part in value.chunk(3, dim=0)), strict=True))
        else:
            out[theirs[0]] = _swap_halves(value) if how == "swap" else value
    return out


def mmdit_state_from_diffusers(cfg: MMDiTConfig, tensors: dict[str, torch.Tensor],
                               what: str = "SD3Transformer2DModel weights") -> dict[str, torch.Tensor]:
    """`SD3Transformer2DModel` weights → ours, checked against `cfg`."""
    rules = _mmdit_rules(cfg)
    expected = {t for _, theirs, _ in rules for t in theirs}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{what}: {len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys "
                              f"{unexpected[:4]} (the weights do not fit the config)")
    out = {}
    for ours, theirs, how in rules:
        if how == "qkv":
            out[ours] = torch.cat([tensors[t] for t in theirs], dim=0)
        else:
            out[ours] = _swap_halves(tensors[theirs[0]]) if how == "swap" else tensors[theirs[0]]
    check_shapes(MMDiT, cfg, out, what)
    return out


_TRANSFORMER_READ = {"sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                     "out_channels", "pos_embed_max_size", "dual_attention_layers", "qk_norm"}


def mmdit_config_from_diffusers(config: dict[str, Any], what: str = "transformer/config.json"
                                ) -> tuple[MMDiTConfig, int]:
    """Our `MMDiTConfig` and the latent sample size of an `SD3Transformer2DModel` config.json."""
    if config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ConfigError(f"{what}: _class_name = {config['_class_name']!r} is not supported (the supported "
                          "transformer is SD3's SD3Transformer2DModel)")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _TRANSFORMER_READ)
    if unknown:
        raise ConfigError(f"{what}: fields {unknown} are not supported by this reader")
    c = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
         "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
         "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
         "qk_norm": None, **config}  # diffusers' defaults
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_projection_dim"] != hidden:
        raise ConfigError(f"{what}: caption_projection_dim = {c['caption_projection_dim']} differs from the width "
                          f"{hidden} (heads × head dim); SD3's context tokens are projected to the width")
    if c["qk_norm"] not in (None, "rms_norm"):
        raise ConfigError(f"{what}: qk_norm = {c['qk_norm']!r} is not supported (None or 'rms_norm')")
    cfg = MMDiTConfig(in_channels=c["in_channels"], out_channels=c["out_channels"] or c["in_channels"],
                      patch_size=c["patch_size"], hidden_size=hidden, depth=c["num_layers"],
                      num_heads=c["num_attention_heads"], context_dim=c["joint_attention_dim"],
                      adm_in_channels=c["pooled_projection_dim"], pos_embed_max_size=c["pos_embed_max_size"],
                      qk_norm=c["qk_norm"] == "rms_norm", dual_attention_layers=tuple(c["dual_attention_layers"]))
    return cfg, int(c["sample_size"])


def mmdit_config_to_diffusers(cfg: MMDiTConfig, sample_size: int) -> dict[str, Any]:
    """An `SD3Transformer2DModel` config.json for our MMDiT."""
    for ok, field, value, expected in (
            (cfg.mlp_ratio == 4.0, "mlp_ratio", cfg.mlp_ratio, "4"),
            (cfg.adm_in_channels is not None, "adm_in_channels", cfg.adm_in_channels, "a vector condition width"),
            (cfg.concat_channels == 0, "concat_channels", cfg.concat_channels, "0")):
        if not ok:
            raise ConfigError(f"mmdit.{field} = {value!r}: diffusers' SD3Transformer2DModel needs {expected}")
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.30.0", "sample_size": sample_size,
            "patch_size": cfg.patch_size, "in_channels": cfg.in_channels, "num_layers": cfg.depth,
            "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.hidden_size,
            "pooled_projection_dim": cfg.adm_in_channels, "out_channels": cfg.out_channels,
            "pos_embed_max_size": cfg.pos_embed_max_size, "dual_attention_layers": list(cfg.dual_attention_layers),
            "qk_norm": "rms_norm" if cfg.qk_norm else None}


def infer_mmdit_config(tensors: dict[str, torch.Tensor], num_heads: int | None, where: str) -> MMDiTConfig:
    """The MMDiT's architecture from its weights' shapes (Stability's names); `num_heads` when known."""
    proj = tensors["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("joint_blocks."))
    ln_q = tensors.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if num_heads is None:
        num_heads = max(1, hidden // (ln_q.shape[0] if ln_q is not None else SD3_HEAD_WIDTH))
    side = int(round(tensors["pos_embed"].shape[1] ** 0.5))
    y = tensors.get("y_embedder.mlp.0.weight")
    dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in tensors)
    cfg = MMDiTConfig(in_channels=in_channels, out_channels=tensors["final_layer.linear.weight"].shape[0] // patch**2,
                      patch_size=patch, hidden_size=hidden, depth=depth, num_heads=num_heads,
                      mlp_ratio=tensors["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
                      context_dim=tensors["context_embedder.weight"].shape[1],
                      adm_in_channels=None if y is None else y.shape[1], pos_embed_max_size=side,
                      qk_norm=ln_q is not None, dual_attention_layers=dual)
    check_shapes(MMDiT, cfg, tensors, f"{where}: the MMDiT (model.diffusion_model.*)")
    return cfg


# --- text encoders -----------------------------------------------------------------------------------------------

def sd3_conditioning(clip: ClipTextConfig, clip_2: ClipTextConfig, t5: dict[str, Any] | None,
                     t5_max_length: int = 256) -> ConditioningConfig:
    """The conditioning of an SD3 model with these (full-depth) encoder configs: CLIP read at its penultimate
    layer without the final LayerNorm, as SDXL reads it."""
    return ConditioningConfig(encoder="sd3", clip=sdxl_clip(clip), clip_2=sdxl_clip(clip_2), t5=t5,
                              t5_max_length=t5_max_length)


def clip_l_projection(weights: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """CLIP-L's weights with a projection: SD3 single files leave out the identity that SD3 applies."""
    return weights if PROJECTION in weights else {**weights, PROJECTION: torch.eye(width, dtype=weights[
        "final_layer_norm.weight"].dtype, device=weights["final_layer_norm.weight"].device)}


def text_to_transformers(conditioning: ConditioningConfig, tensors: dict[str, torch.Tensor]
                         ) -> dict[str, dict[str, torch.Tensor]]:
    """Each encoder's weights in transformers' names, by our part name."""
    parts = split_weights(tensors, "SD3 text encoder weights")
    out = {name: transformers_names(getattr(conditioning, name), parts[name]) for name in CLIP_NAMES}
    if conditioning.t5 is not None:
        out["t5"] = t5_weights(parts["t5"], "SD3's T5 weights")
    return out


def text_from_transformers(conditioning: ConditioningConfig, parts: dict[str, dict[str, torch.Tensor]],
                           where: str) -> dict[str, torch.Tensor]:
    """Our `clip.*`, `clip_2.*`, `t5.*` weights of transformers-named ones, the CLIP ones checked."""
    out = {}
    for name in CLIP_NAMES:
        full = dataclasses.replace(getattr(conditioning, name), layer="last", final_norm=True)
        out.update({f"{name}.{k}": v for k, v in from_transformers(full, parts[name], f"{where} ({name})").items()})
    if conditioning.t5 is not None:
        out.update({f"t5.{k}": v for k, v in t5_weights(parts["t5"], f"{where} (t5)").items()})
    return out


def t5_tokenizer_beside(path: Path, option: str | os.PathLike | None) -> Path | None:
    """Where a single file's T5 tokenizer is: `option`, else a `tokenizer_3/` folder beside the file."""
    if option is not None:
        return Path(option)
    beside = path.parent / DIFFUSERS_TEXT["t5"][1]
    return beside if (beside / "tokenizer.json").is_file() else None
