"""ControlNet files in the two layouts people share, read and written:

- original (lllyasviel's `control_sd15_canny.pth`, `control_v11p_sd15_seg.safetensors`, ...): `control_model.*`
  keys (some files drop the prefix) that mirror `cldm.ControlNet`, i.e. our module names; the architecture is
  read off the shapes (SD 1.x: 8 heads, SD 2.x: 64 channels a head), or from our own metadata when we wrote it;
- diffusers `ControlNetModel` folders (`config.json` + `diffusion_pytorch_model.safetensors`): the encoder under
  the UNet's diffusers names (`formats/keymaps.py`), plus `controlnet_cond_embedding.*` (the hint encoder),
  `controlnet_down_blocks.N` and `controlnet_mid_block` (the zero convolutions).
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from latent_diffusion.config import UNetConfig, from_dict, to_dict
from latent_diffusion.controlnet import ControlNet, ControlNetConfig
from latent_diffusion.files.weights import (CheckpointError, module_from_weights, read_metadata, read_weights,
                                            place_weights, save_weights)
from latent_diffusion.formats.diffusers_config import DIFFUSERS_VERSION, unet_config_from_diffusers, \
    unet_config_to_diffusers
from latent_diffusion.formats.diffusers_format import load_bin, read_json, write_json
from latent_diffusion.formats.keymaps import convert_state, module_shapes, unet_to_diffusers
from latent_diffusion.formats.original_format import PICKLE_SUFFIXES, infer_unet_config, load_original_state_dict

ControlNetFormat = Literal["original", "diffusers"]
PREFIX = "control_model."
METADATA_KEY = "latent_diffusion.controlnet"  # our config, in the safetensors header of files we write
CONFIG_FILE, WEIGHTS_FILE = "config.json", "diffusion_pytorch_model.safetensors"
# ControlNetModel's own config.json fields (the rest are UNet2DConditionModel's)
_CONTROLNET_FIELDS = ("conditioning_channels", "controlnet_conditioning_channel_order",
                      "conditioning_embedding_out_channels", "global_pool_conditions")
_KEPT_UNET_FIELDS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                     "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
                     "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                     "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim",
                     "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
                     "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
                     "projection_class_embeddings_input_dim")
_UP = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


def is_controlnet(path: str | os.PathLike) -> bool:
    """Whether `path` holds a ControlNet: a folder whose config.json is a ControlNetModel's, or a weights file
    (.safetensors, or a .pth/.ckpt zip archive) with a hint encoder (`input_hint_block`), seen without loading it."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_FILE
        return config.is_file() and read_json(config).get("_class_name") == "ControlNetModel"
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return _has_hint_encoder(f.keys())
    if path.suffix in PICKLE_SUFFIXES and zipfile.is_zipfile(path):
        return _has_hint_encoder(_pickled_strings(path))
    return False


def _has_hint_encoder(keys: Iterable[str]) -> bool:
    return any(k.removeprefix(PREFIX).startswith("input_hint_block.") for k in keys)


def _pickled_strings(path: Path) -> list[str]:
    """The strings in the pickle of a `torch.save` zip archive (its state dict's keys among them), read from its
    opcodes: nothing is unpickled and no tensor is read. Legacy (pre-zip) pickles are not looked into."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            data = archive.read(name) if name else b""
        return [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    except (zipfile.BadZipFile, ValueError):  # corrupt: not recognised here, load_controlnet / load_model say why
        return []


def load_controlnet(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32) -> ControlNet:
    """The ControlNet in `path` (a diffusers folder, or an original .safetensors / .pth file), on `device` in
    `dtype`; a CheckpointError naming what does not fit."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet not found: {path}")
    cfg, tensors = read_diffusers_controlnet(path) if path.is_dir() else read_original_controlnet(path)
    return module_from_weights(lambda: ControlNet(cfg), tensors, f"ControlNet {path}", dtype, device).eval()


def save_controlnet(net: ControlNet, path: str | os.PathLike, fmt: ControlNetFormat = "original") -> None:
    """Write `net` as an original file (`control_model.*` keys, .safetensors) or a diffusers folder, atomically."""
    state = {k: v.detach() for k, v in net.state_dict().items()}
    path = Path(path)
    if fmt == "original":
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: an original ControlNet is written as a .safetensors file")
        save_weights({PREFIX + k: v for k, v in state.items()}, path,
                     {METADATA_KEY: json.dumps(to_dict(net.config))})
    elif fmt == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        save_weights(controlnet_state_to_diffusers(net.config, state), path / WEIGHTS_FILE)
        write_json(controlnet_config_to_diffusers(net.config), path / CONFIG_FILE)
    else:
        raise ValueError(f"format = {fmt!r}: expected 'original' or 'diffusers'")


# --- original -----------------------------------------------------------------------------------------------------

def read_original_controlnet(path: Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of an original ControlNet file."""
    state = load_original_state_dict(path)
    prefixed = [k for k in state if k.startswith(PREFIX)]
    if prefixed:
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if "input_hint_block.0.weight" not in state:
        raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block.*; keys start "
                              f"{sorted({k.split('.')[0] for k in state})[:6]})")
    stored = read_metadata(path).get(METADATA_KEY) if path.suffix == ".safetensors" else None
    if stored:
        data = json.loads(stored)
        return ControlNetConfig(from_dict(UNetConfig, data["unet"]), tuple(data["conditioning_channels"]),
                                data["hint_channels"]), state
    return infer_controlnet_config(state, str(path)), state


def infer_controlnet_config(state: dict[str, torch.Tensor], where: str) -> ControlNetConfig:
    """A ControlNet's architecture from its weights' shapes (heads by the SD 1.x / 2.x convention)."""
    convs = sorted(int(m[1]) for k in state if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    widths = [state[f"input_hint_block.{i}.weight"].shape[0] for i in convs[:-1]]
    context = state.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    openclip = context is not None and context.shape[1] == 1024  # SD 2.x's OpenCLIP ViT-H tokens
    latent_channels = state["input_blocks.0.0.weight"].shape[1]
    try:
        unet = infer_unet_config(state, latent_channels, openclip, {})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot read the ControlNet's architecture from its weights ({exc})") from exc
    return ControlNetConfig(unet, tuple(widths[0::2]), state[f"input_hint_block.{convs[0]}.weight"].shape[1])


# --- diffusers ----------------------------------------------------------------------------------------------------

def _hint_names(cfg: ControlNetConfig) -> dict[str, str]:
    """Our hint-encoder convolutions → diffusers' `controlnet_cond_embedding` names (cldm's index 2k: every
    convolution, SiLUs between)."""
    blocks = 2 * (len(cfg.conditioning_channels) - 1)
    names = {"input_hint_block.0": "controlnet_cond_embedding.conv_in",
             f"input_hint_block.{2 * (blocks + 1)}": "controlnet_cond_embedding.conv_out"}
    names.update({f"input_hint_block.{2 * (j + 1)}": f"controlnet_cond_embedding.blocks.{j}" for j in range(blocks)})
    return names


def controlnet_to_diffusers(cfg: ControlNetConfig) -> dict[str, str]:
    """Each key of `ControlNet(cfg)` → its `ControlNetModel` name."""
    keys = list(module_shapes(ControlNet, cfg))
    prefixes = {**_hint_names(cfg), "middle_block_out.0": "controlnet_mid_block",
                **{f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(_input_blocks(cfg))}}
    own = {k: f"{prefixes[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}" for k in keys
           if k.rsplit(".", 1)[0] in prefixes}
    encoder = unet_to_diffusers(cfg.unet, [k for k in keys if k not in own])
    return {**encoder, **own}


def _input_blocks(cfg: ControlNetConfig) -> int:
    """The encoder's input blocks: conv_in, then per level its ResBlocks and (but the last) a Downsample."""
    return len(cfg.unet.channel_mult) * (cfg.unet.num_res_blocks + 1)


def controlnet_state_to_diffusers(cfg: ControlNetConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ControlNet weights → `ControlNetModel` weights."""
    mapping = controlnet_to_diffusers(cfg)
    shapes = module_shapes(ControlNet, cfg)
    return convert_state(state, mapping, {mapping[k]: s for k, s in shapes.items()}, "ControlNet weights")


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """A `ControlNetModel` config.json."""
    unet = unet_config_to_diffusers(cfg.unet, sample_size=0)
    return {"_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION,
            **{k: unet[k] for k in _KEPT_UNET_FIELDS if k in unet}, "conditioning_channels": cfg.hint_channels,
            "controlnet_conditioning_channel_order": "rgb",
            "conditioning_embedding_out_channels": list(cfg.conditioning_channels), "global_pool_conditions": False}


def controlnet_config_from_diffusers(config: dict[str, Any], what: str) -> ControlNetConfig:
    """Our `ControlNetConfig` of a `ControlNetModel` config.json (RGB control images, no pooled conditions)."""
    if config.get("_class_name") != "ControlNetModel":
        raise CheckpointError(f"{what}: _class_name = {config.get('_class_name')!r}, expected ControlNetModel")
    for key, expected in (("controlnet_conditioning_channel_order", "rgb"), ("global_pool_conditions", False)):
        if config.get(key, expected) != expected:
            raise CheckpointError(f"{what}: {key} = {config[key]!r} is not supported (only {expected!r})")
    down = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    unet = {**{k: v for k, v in config.items() if k not in _CONTROLNET_FIELDS},
            "_class_name": "UNet2DConditionModel", "up_block_types": [_UP.get(b, b) for b in reversed(down)],
            "out_channels": config.get("in_channels", 4)}
    unet_cfg, _ = unet_config_from_diffusers(unet, what)
    return ControlNetConfig(unet_cfg, tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                            int(config.get("conditioning_channels", 3)))


def read_diffusers_controlnet(folder: Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of a diffusers `ControlNetModel` folder."""
    cfg = controlnet_config_from_diffusers(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    for name in (WEIGHTS_FILE, "diffusion_pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            tensors = read_weights(path) if path.suffix == ".safetensors" else place_weights(load_bin(path))
            break
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (or .bin)")
    theirs = {v: k for k, v in controlnet_to_diffusers(cfg).items()}
    return cfg, convert_state(tensors, theirs, module_shapes(ControlNet, cfg), f"ControlNet weights {path}")
