"""IP-Adapter files as released (tencent-ailab/IP-Adapter, h94/IP-Adapter on the Hub) and the image prompts built
from them (`conditioning.image_prompt`).

A `.bin` is `torch.save({"image_proj": {...}, "ip_adapter": {...}})` (read with `weights_only=True`: never run);
a `.safetensors` holds the same tensors under flat keys `image_proj.proj.weight`, `ip_adapter.1.to_k_ip.weight`
(diffusers' `load_ip_adapter` splits them the same way). `image_proj` is the projection (its keys tell IP-Adapter
from IP-Adapter Plus), `ip_adapter` the key/value weights of each cross-attention layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from latent_diffusion.conditioning.image_prompt import (ImagePrompt, attach_ip_adapter, image_projection,
                                                        load_image_encoder, projection_kind)
from latent_diffusion.files.weights import CheckpointError, load_pickle, load_weights
from latent_diffusion.formats.lora import CONTEXT_FAMILIES, PICKLE_SUFFIXES
from latent_diffusion.unet import UNetModel

PARTS = ("image_proj", "ip_adapter")


class IPAdapterError(CheckpointError):
    """An IP-Adapter file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class IPAdapterFile:
    """The two state dicts of an IP-Adapter file, keys without their part's prefix."""

    path: Path
    kind: str  # "ip-adapter" or "ip-adapter-plus"
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]


def read_ip_adapter(path: str | os.PathLike) -> IPAdapterFile:
    """An IP-Adapter `.bin` or `.safetensors` file, its kind told by its `image_proj` keys; IPAdapterError else."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"IP-Adapter file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        parts = _split(path, load_weights(path))
    elif suffix in PICKLE_SUFFIXES:
        stored = load_pickle(path)
        if isinstance(stored, dict) and set(stored) == set(PARTS):
            parts = {part: stored[part] for part in PARTS}
        elif isinstance(stored, dict):
            parts = _split(path, stored)
        else:
            raise IPAdapterError(f"IP-Adapter {path}: expected a dictionary, got {type(stored).__name__}")
    else:
        raise IPAdapterError(f"IP-Adapter {path}: expected a .safetensors file (or {', '.join(PICKLE_SUFFIXES)})")
    for part, tensors in parts.items():
        if not isinstance(tensors, dict) or not tensors or not all(
                isinstance(v, torch.Tensor) for v in tensors.values()):
            raise IPAdapterError(f"IP-Adapter {path}: '{part}' holds no named tensors")
    try:
        kind = projection_kind(parts["image_proj"])
    except ValueError as exc:
        raise IPAdapterError(f"IP-Adapter {path}: {exc}") from None
    return IPAdapterFile(path, kind, parts["image_proj"], parts["ip_adapter"])


def _split(path: Path, flat: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from keys `image_proj.<key>` and `ip_adapter.<key>`."""
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    others = []
    for key, value in flat.items():
        part, _, rest = str(key).partition(".")
        if part in parts and rest:
            parts[part][rest] = value
        else:
            others.append(key)
    if others:
        raise IPAdapterError(f"IP-Adapter {path}: keys outside image_proj.* and ip_adapter.* (e.g. {others[:3]}): "
                             "not an IP-Adapter file?")
    return parts


def load_image_prompt(adapter_path: str | os.PathLike, encoder_path: str | os.PathLike, unet: UNetModel,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, scale: float = 1.0,
                      name: str = "ip_adapter", encoder_config: str | os.PathLike | None = None) -> ImagePrompt:
    """The `ImagePrompt` of an IP-Adapter file and its CLIP image encoder (`load_image_encoder`), its key/value
    streams attached to `unet` as `name` with weight `scale`; IPAdapterError for a file of another model."""
    file = read_ip_adapter(adapter_path)
    try:
        projection = image_projection(file.image_proj, dtype, device)
    except (ValueError, KeyError, CheckpointError) as exc:
        raise IPAdapterError(f"IP-Adapter {file.path}: image_proj: {exc}") from None
    context_dim = unet.config.context_dim
    if projection.out_features != context_dim:
        family = CONTEXT_FAMILIES.get(projection.out_features)
        raise IPAdapterError(f"IP-Adapter {file.path}: its image tokens are {projection.out_features} wide"
                             f"{f' ({family})' if family else ''}, this UNet's cross-attention reads {context_dim}: "
                             "an IP-Adapter for another model")
    encoder = load_image_encoder(encoder_path, device, dtype, encoder_config)
    try:
        prompt = ImagePrompt(encoder, projection, name)
        attach_ip_adapter(unet, file.ip_adapter, scale, name)
    except ValueError as exc:
        raise IPAdapterError(f"IP-Adapter {file.path} with image encoder {encoder_path}: {exc}") from None
    return prompt
