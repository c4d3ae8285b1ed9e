"""Explicit key maps between our (CompVis-layout) modules and diffusers' layout, derived from the config."""

from __future__ import annotations

from latent_diffusion.config import UNetConfig

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
