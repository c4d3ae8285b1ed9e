"""Explicit key maps between our (CompVis-layout) modules and the diffusers / transformers layouts, from the config.

Each `*_state_*` function renames a whole state dict through `convert_state`, which requires the map to cover every
key (naming the missing and unexpected ones) and checks every tensor's shape against the module the config builds.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from latent_diffusion.autoencoder import AutoencoderKL, VQAutoencoder
from latent_diffusion.conditioning.clip import ClipTextTransformer
from latent_diffusion.config import AutoencoderConfig, ClipTextConfig, UNetConfig
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.unet import UNetModel

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_to_diffusers(cfg: UNetConfig, keys: list[str]) -> dict[str, str]:
    """Map each of our UNet state-dict `keys` to its `UNet2DConditionModel` name; every key must be covered."""
    prefixes = _unet_prefix_map(cfg)
    mapping = {}
    for key in keys:
        for ours in sorted(prefixes, key=len, reverse=True):
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1:]
                mapping[key] = f"{prefixes[ours]}.{_rename_resblock(rest)}" if _is_resblock_rest(rest) else \
                    f"{prefixes[ours]}.{rest}"
                break
        else:
            raise KeyError(f"no diffusers name for UNet key {key!r}")
    return mapping


def _is_resblock_rest(rest: str) -> bool:
    return any(rest.startswith(k + ".") for k in _RESBLOCK)


def _rename_resblock(rest: str) -> str:
    for ours, theirs in _RESBLOCK.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def _unet_prefix_map(cfg: UNetConfig) -> dict[str, str]:
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    prefixes = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                "time_embed.2": "time_embedding.linear_2", "label_emb": "class_embedding",
                "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
                "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                "middle_block.2": "mid_block.resnets.1", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for level in range(levels):
        for j in range(n):
            block = 1 + level * (n + 1) + j
            prefixes[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            prefixes[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            prefixes[f"input_blocks.{(level + 1) * (n + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for level in range(levels):  # diffusers' up_blocks[0] is the deepest level, like our output_blocks order
        for j in range(n + 1):
            block = level * (n + 1) + j
            prefixes[f"output_blocks.{block}.0"] = f"up_blocks.{level}.resnets.{j}"
            prefixes[f"output_blocks.{block}.1"] = f"up_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            last = level * (n + 1) + n
            for position in (1, 2):  # after the ResBlock, or after ResBlock + transformer
                prefixes[f"output_blocks.{last}.{position}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    return prefixes


# --- renaming whole state dicts, with coverage and shape checks -------------------------------------------------

@functools.cache
def module_shapes(module_class: type[nn.Module], cfg) -> dict[str, torch.Size]:
    """Every state-dict key of `module_class(cfg)` with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in module_class(cfg).state_dict().items()}


def check_shapes(module_class: type[nn.Module], cfg, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Names and shapes of `tensors` against `module_class(cfg)`'s state dict (`convert_state` without renaming)."""
    shapes = module_shapes(module_class, cfg)
    convert_state(tensors, {k: k for k in shapes}, shapes, what)


def convert_state(tensors: dict[str, torch.Tensor], mapping: dict[str, str], shapes: dict[str, torch.Size],
                  what: str, reshape: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Rename `tensors` by `mapping` (source → target name), which must cover exactly their keys; each result must
    have `shapes[target]` (targets in `reshape` may move between (C, C) and (C, C, 1, 1))."""
    missing = sorted(set(mapping) - set(tensors))
    unexpected = sorted(set(tensors) - set(mapping))
    if missing or unexpected:
        raise CheckpointError(f"{what}: {len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys "
                              f"{unexpected[:6]} (the weights do not fit the config)")
    out, wrong = {}, []
    for source, target in mapping.items():
        value = tensors[source]
        if target in reshape and value.shape != shapes[target] and value.numel() == shapes[target].numel():
            value = value.reshape(shapes[target])
        if value.shape != shapes[target]:
            wrong.append(f"{source}: {tuple(value.shape)}, expected {tuple(shapes[target])}")
        out[target] = value
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} shape mismatches (the weights do not fit the config), "
                              f"e.g. {wrong[:4]}")
    return out


def _by_prefix(keys: list[str], prefixes: dict[str, str], rename_rest, what: str) -> dict[str, str]:
    """Map each key by its longest matching prefix in `prefixes`; `rename_rest(prefix, rest)` renames the rest."""
    ordered = sorted(prefixes, key=len, reverse=True)
    mapping = {}
    for key in keys:
        ours = next((p for p in ordered if key.startswith(p + ".")), None)
        if ours is None:
            raise CheckpointError(f"no {what} name for key {key!r}")
        mapping[key] = f"{prefixes[ours]}.{rename_rest(ours, key[len(ours) + 1:])}"
    return mapping


# --- UNet --------------------------------------------------------------------------------------------------------

def unet_from_diffusers(cfg: UNetConfig) -> dict[str, str]:
    """`UNet2DConditionModel` name → our name, for every key of `UNetModel(cfg)` (the inverse of unet_to_diffusers)."""
    return {theirs: ours for ours, theirs in unet_to_diffusers(cfg, list(module_shapes(UNetModel, cfg))).items()}


def unet_state_to_diffusers(cfg: UNetConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our UNet weights → `UNet2DConditionModel` weights (same shapes)."""
    shapes = module_shapes(UNetModel, cfg)
    mapping = unet_to_diffusers(cfg, list(shapes))
    return convert_state(tensors, mapping, {mapping[k]: s for k, s in shapes.items()}, "UNet weights")


def unet_state_from_diffusers(cfg: UNetConfig, tensors: dict[str, torch.Tensor],
                              what: str = "diffusers UNet weights") -> dict[str, torch.Tensor]:
    """`UNet2DConditionModel` weights → our UNet weights."""
    return convert_state(tensors, unet_from_diffusers(cfg), module_shapes(UNetModel, cfg), what)


# --- autoencoder -------------------------------------------------------------------------------------------------

_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _vae_prefix_map(cfg: AutoencoderConfig) -> dict[str, str]:
    n = len(cfg.ch_mult)
    prefixes = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv", "quantize": "quantize"}
    for side in ("encoder", "decoder"):
        prefixes.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                         f"{side}.norm_out": f"{side}.conv_norm_out",
                         f"{side}.mid.block_1": f"{side}.mid_block.resnets.0",
                         f"{side}.mid.attn_1": f"{side}.mid_block.attentions.0",
                         f"{side}.mid.block_2": f"{side}.mid_block.resnets.1"})
    for level in range(n):
        for j in range(cfg.num_res_blocks):
            prefixes[f"encoder.down.{level}.block.{j}"] = f"encoder.down_blocks.{level}.resnets.{j}"
        prefixes[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = n - 1 - level  # diffusers' up_blocks[0] is the deepest level; our decoder.up[0] the full-resolution one
        for j in range(cfg.num_res_blocks + 1):
            prefixes[f"decoder.up.{level}.block.{j}"] = f"decoder.up_blocks.{up}.resnets.{j}"
        prefixes[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return prefixes


def _rename_vae_rest(prefix: str, rest: str) -> str:
    table = _VAE_ATTENTION if prefix.endswith("attn_1") else _VAE_RESNET
    name, dot, param = rest.rpartition(".")
    return f"{table.get(name, name)}.{param}" if dot else rest


def _autoencoder_class(cfg: AutoencoderConfig) -> type[nn.Module]:
    return VQAutoencoder if cfg.regularizer == "vq" else AutoencoderKL


def vae_to_diffusers(cfg: AutoencoderConfig) -> dict[str, str]:
    """Our (CompVis) autoencoder name → diffusers `AutoencoderKL` (or, for a VQ model, `VQModel`) name, for every
    key of our model."""
    return _by_prefix(list(module_shapes(_autoencoder_class(cfg), cfg)), _vae_prefix_map(cfg), _rename_vae_rest,
                      "diffusers AutoencoderKL")


def _vae_attention_weights(names) -> frozenset[str]:
    return frozenset(k for k in names if ".attentions." in k and k.endswith("weight") and "group_norm" not in k)


def vae_state_to_diffusers(cfg: AutoencoderConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our autoencoder weights → diffusers `AutoencoderKL` weights (attention 1×1 convs become Linear weights)."""
    shapes, mapping = module_shapes(_autoencoder_class(cfg), cfg), vae_to_diffusers(cfg)
    reshape = _vae_attention_weights(mapping.values())
    targets = {mapping[k]: s[:2] if mapping[k] in reshape else s for k, s in shapes.items()}
    return convert_state(tensors, mapping, targets, "autoencoder weights", reshape)


def vae_state_from_diffusers(cfg: AutoencoderConfig, tensors: dict[str, torch.Tensor],
                             what: str = "diffusers AutoencoderKL weights") -> dict[str, torch.Tensor]:
    """Diffusers `AutoencoderKL` weights (current or legacy `query/key/value/proj_attn` names) → ours."""
    tensors = {_modern_vae_name(k): v for k, v in tensors.items()}
    mapping = {theirs: ours for ours, theirs in vae_to_diffusers(cfg).items()}
    reshape = frozenset(mapping[k] for k in _vae_attention_weights(mapping))
    return convert_state(tensors, mapping, module_shapes(_autoencoder_class(cfg), cfg), what, reshape)


def _modern_vae_name(key: str) -> str:
    block, _, rest = key.partition(".attentions.0.")
    name, _, param = rest.rpartition(".")
    return f"{block}.attentions.0.{_VAE_LEGACY_ATTENTION[name]}.{param}" if name in _VAE_LEGACY_ATTENTION else key


# --- CLIP text encoder -------------------------------------------------------------------------------------------

TRANSFORMERS_CLIP_PREFIX = "text_model."


def clip_state_to_transformers(cfg: ClipTextConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP text weights → transformers `CLIPTextModel` weights (`text_model.` + our name)."""
    shapes = module_shapes(ClipTextTransformer, cfg)
    return convert_state(tensors, {k: TRANSFORMERS_CLIP_PREFIX + k for k in shapes},
                         {TRANSFORMERS_CLIP_PREFIX + k: s for k, s in shapes.items()}, "CLIP text weights")


def clip_state_from_transformers(cfg: ClipTextConfig, tensors: dict[str, torch.Tensor],
                                 what: str = "CLIPTextModel weights") -> dict[str, torch.Tensor]:
    """`CLIPTextModel` weights (with or without the `text_model.` prefix, as transformers 4 / 5 save them) → ours."""
    shapes = module_shapes(ClipTextTransformer, cfg)
    names = {k: k.removeprefix(TRANSFORMERS_CLIP_PREFIX) for k in tensors}
    names = {k: name for k, name in names.items() if name != "embeddings.position_ids"}  # a constant buffer
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{what}: some keys appear both with and without the '{TRANSFORMERS_CLIP_PREFIX}' prefix")
    return convert_state({k: tensors[k] for k in names}, names, shapes, what)


def drop_last_clip_layer(cfg: ClipTextConfig, tensors: dict[str, torch.Tensor]
                         ) -> tuple[ClipTextConfig, dict[str, torch.Tensor]]:
    """A 'penultimate' text encoder as the equal (layers − 1)-layer 'last' one (the final LayerNorm applies to both)."""
    if cfg.layer != "penultimate":
        return cfg, tensors
    last = f"encoder.layers.{cfg.layers - 1}."
    kept = {k: v for k, v in tensors.items() if not k.startswith(last)}
    return dataclasses.replace(cfg, layers=cfg.layers - 1, layer="last"), kept
