"""Image prompts by IP-Adapter (Ye et al. 2023): a frozen CLIP image encoder, a small projection to a few tokens, and
decoupled cross-attention (eq. 5), Attention(Q, K, V) + λ·Attention(Q, K', V'), in every cross-attention layer of
the UNet (`nn.attention.KVStream`, passed the tokens as `UNetModel.forward(..., extra_context={name: tokens})`).

Module names mirror the released files' `image_proj.*` keys (tencent-ailab/IP-Adapter `ImageProjModel` and
`resampler.Resampler`), so their weights load one-to-one; the cross-attention streams take `ip_adapter.{n}.to_k_ip`
/ `to_v_ip` in diffusers' numbering (`cross_attention_layers`). Reading the files is `formats/ip_adapter.py`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latent_diffusion.conditioning.minilm import _no_loading_bar
from latent_diffusion.files.weights import CheckpointError, load_weights, module_from_weights
from latent_diffusion.nn.attention import CrossAttention, KVStream
from latent_diffusion.unet import UNetModel

# OPENAI_CLIP_MEAN / OPENAI_CLIP_STD of transformers' image_utils: what CLIPImageProcessor normalises with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLER_DIM_HEAD = 64  # IP-Adapter's Resampler default; diffusers' converter assumes it (heads = to_q rows // 64)


# --- the CLIP image encoder ---------------------------------------------------------------------------------------

def clip_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images → CLIP pixel values (B, 3, size, size), as transformers' CLIPImageProcessor makes them."""
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, Image.Image) for i in images):
        raise ValueError(f"images: expected a non-empty list of PIL images, got {type(images).__name__}")
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return torch.stack([(_resize_and_crop(_rgb(image), size) - mean) / std for image in images])


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (transformers' image_transforms.convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _resize_and_crop(image: Image.Image, size: int) -> torch.Tensor:
    """Short side to `size` (bicubic, 8-bit), the centre size×size crop → (3, size, size) in [0, 1]. The long side is
    truncated, size·long/short, and the crop starts at (extent − size) // 2, as in transformers'
    `get_resize_output_image_size(default_to_square=False)` and `center_crop`."""
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    w, h = (size, long) if w <= h else (long, size)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float64) / 255
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)  # (3, size, size)


def load_image_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, config: str | os.PathLike | None = None) -> nn.Module:
    """transformers' `CLIPVisionModelWithProjection` from a folder (config.json + model.safetensors, as IP-Adapter's
    `image_encoder/`) or a .safetensors file and its config.json (`config`, default: the one beside it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config = Path(config) if config is not None else weights.parent / "config.json"
    if not weights.is_file() or weights.suffix != ".safetensors":
        raise CheckpointError(f"image encoder {path}: expected a folder with model.safetensors or a .safetensors file")
    if not config.is_file():
        raise CheckpointError(f"image encoder {path}: its config {config} is missing (pass config=config.json)")
    with _no_loading_bar():
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            None, config=CLIPVisionConfig.from_pretrained(config), state_dict=load_weights(weights),
            output_loading_info=True)
    wrong = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
    if wrong or info.get("error_msgs"):
        raise CheckpointError(f"image encoder {weights} does not fit a CLIPVisionModelWithProjection of {config}: "
                              f"{wrong or info['error_msgs']}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --- the projections of the released files ------------------------------------------------------------------------

class ImageProjection(nn.Module):
    """IP-Adapter's `ImageProjModel`: CLIP image embedding (B, E) → Linear → num_tokens × LayerNorm → (B, T, D)."""

    reads_hidden_states = False  # reads `image_embeds`, the projected CLIP embedding

    def __init__(self, embed_dim: int, num_tokens: int, cross_attention_dim: int):
        super().__init__()
        self.num_tokens, self.in_features, self.out_features = num_tokens, embed_dim, cross_attention_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(image_embeds.shape[0], self.num_tokens, -1)  # (B, T, D)
        return self.norm(tokens)  # (B, T, D)


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and themselves (Flamingo's perceiver resampler), pre-LayerNorm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        inner = heads * RESAMPLER_DIM_HEAD
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, N, W) image features, latents (B, Q, W) → (B, Q, W)."""
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, N + Q, h·d) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.to_q(latents), k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Q, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, Q, W)


class Resampler(nn.Module):
    """IP-Adapter Plus's projection: `num_queries` learned latents read the CLIP encoder's penultimate hidden states
    (B, N, E) through `depth` perceiver blocks → (B, num_queries, D)."""

    reads_hidden_states = True  # the CLIP encoder's penultimate hidden states, as diffusers' `encode_image`

    def __init__(self, embed_dim: int, dim: int, output_dim: int, depth: int, heads: int, num_queries: int,
                 ff_mult: int = 4):
        super().__init__()
        self.in_features, self.out_features = embed_dim, output_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False))]) for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden_states)  # (B, N, W)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, Q, W)
        for attention, feed_forward in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(latents))  # (B, Q, D)


def projection_kind(state: Mapping[str, torch.Tensor]) -> str:
    """"ip-adapter" or "ip-adapter-plus" from the keys of an `image_proj` state dict; a ValueError for the others."""
    if "proj.weight" in state and "norm.weight" in state:
        return "ip-adapter"
    if "latents" in state and "proj_in.weight" in state:
        return "ip-adapter-plus"
    others = {"proj.3.weight": "IP-Adapter Full Face", "perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
              "proj.0.weight": "IP-Adapter FaceID"}  # diffusers loaders/unet.py, in the order it tests them
    kind = next((name for key, name in others.items() if key in state), None)
    raise ValueError(f"image_proj: {kind or 'an unknown projection'} (keys {sorted(state)[:4]}); supported are "
                     "IP-Adapter (proj, norm) and IP-Adapter Plus (latents, proj_in, layers, proj_out, norm_out)")


def image_projection(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = torch.float32,
                     device: str | torch.device | None = None) -> ImageProjection | Resampler:
    """The projection an `image_proj` state dict describes, holding its weights (sizes read from the shapes)."""
    try:
        build = _projection_builder(state)
    except KeyError as exc:
        raise ValueError(f"image_proj: {projection_kind(state)} without its key {exc}") from None
    return module_from_weights(build, dict(state), "image_proj", dtype, device)


def _projection_builder(state: Mapping[str, torch.Tensor]) -> functools.partial:
    """The constructor call of the projection `state` holds, its sizes read from the tensors' shapes."""
    if projection_kind(state) == "ip-adapter":
        dim = state["norm.weight"].shape[0]
        tokens, rest = divmod(state["proj.weight"].shape[0], dim)
        if rest:
            raise ValueError(f"image_proj.proj.weight: {state['proj.weight'].shape[0]} rows, not a multiple of the "
                             f"token width {dim} (norm.weight)")
        build = functools.partial(ImageProjection, state["proj.weight"].shape[1], tokens, dim)
    else:
        depth = sum(1 for key in state if key.endswith(".0.to_q.weight"))
        heads, rest = divmod(state["layers.0.0.to_q.weight"].shape[0], RESAMPLER_DIM_HEAD)
        if rest:
            raise ValueError(f"image_proj.layers.0.0.to_q.weight: {state['layers.0.0.to_q.weight'].shape[0]} rows, "
                             f"not heads × {RESAMPLER_DIM_HEAD}")
        _, queries, dim = state["latents"].shape
        build = functools.partial(Resampler, state["proj_in.weight"].shape[1], dim, state["proj_out.weight"].shape[0],
                                  depth, heads, queries, state["layers.0.1.1.weight"].shape[0] // dim)
    return build


# --- the image prompt: pixels → tokens ------------------------------------------------------------------------------

class ImagePrompt(nn.Module):
    """Images → the tokens (B, T, D) of the UNet's key/value stream `name`, and the null image prompt ∅.

    :param encoder: transformers' `CLIPVisionModelWithProjection` (`load_image_encoder`).
    :param projection: `ImageProjection` (reads the projected image embedding) or `Resampler` (the penultimate
        hidden states), as diffusers' `prepare_ip_adapter_image_embeds` chooses.
    :param name: the stream's name in the cross-attention layers (`attach_ip_adapter`).
    """

    def __init__(self, encoder: nn.Module, projection: ImageProjection | Resampler, name: str = "ip_adapter"):
        super().__init__()
        cfg = encoder.config
        width, what = ((cfg.hidden_size, "hidden states") if projection.reads_hidden_states
                       else (cfg.projection_dim, "image embeddings"))
        if projection.in_features != width:
            raise ValueError(f"projection: reads {what} {projection.in_features} wide, but the image encoder's are "
                             f"{width} wide: an image encoder for another IP-Adapter?")
        self.encoder, self.projection, self.name = encoder, projection, name
        self.image_size = cfg.image_size
        self.requires_grad_(False)
        self.eval()

    def pixels(self, images: Sequence[Image.Image] | Image.Image | torch.Tensor) -> torch.Tensor:
        """CLIP pixel values (B, 3, S, S); a tensor is taken as such (diffusers' `encode_image` does the same)."""
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, torch.Tensor):
            return clip_pixels(images, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images: expected CLIP pixel values of shape (B, 3, {self.image_size}, "
                             f"{self.image_size}), got {tuple(images.shape)}")
        return images

    @torch.no_grad()
    def tokens(self, images: Sequence[Image.Image] | Image.Image | torch.Tensor) -> torch.Tensor:
        """One row of tokens (B, T, D) per image. Several images for one prompt: concatenate rows along T."""
        return self.projection(self.features(self.pixels(images)))

    @torch.no_grad()
    def unconditional(self, batch: int) -> torch.Tensor:
        """The null image prompt (batch, T, D): the projection of a zero image embedding (IP-Adapter), or of the
        hidden states of a zero image (IP-Adapter Plus), as diffusers' `encode_image` makes the negative."""
        if self.projection.reads_hidden_states:
            features = self.features(torch.zeros(1, 3, self.image_size, self.image_size))
        else:
            weight = self.projection.proj.weight
            features = torch.zeros(1, self.projection.in_features, device=weight.device, dtype=weight.dtype)
        return self.projection(features).expand(batch, -1, -1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values (B, 3, S, S) → what the projection reads: (B, E) embeddings or (B, N, W) hidden states,
        in the projection's dtype and device."""
        parameter = next(self.encoder.parameters())
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
        if self.projection.reads_hidden_states:
            features = self.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # (B, N, W)
        else:
            features = self.encoder(pixel_values=pixels).image_embeds  # (B, E)
        weight = next(self.projection.parameters())
        return features.to(device=weight.device, dtype=weight.dtype)


# --- decoupled cross-attention in the UNet --------------------------------------------------------------------------

def cross_attention_layers(unet: UNetModel) -> list[tuple[str, CrossAttention]]:
    """The UNet's cross-attention layers (`attn2`) in the order of diffusers' `unet.attn_processors`, which numbers a
    file's `ip_adapter.{n}` (n = 1, 3, 5, ...: attn1 takes the even numbers): down blocks, up blocks, then the mid
    block, as UNet2DConditionModel registers its children (ours: input, output, middle blocks)."""
    order = ("input_blocks", "output_blocks", "middle_block")
    layers = [(name, module) for name, module in unet.named_modules()
              if name.endswith(".attn2") and isinstance(module, CrossAttention)]
    if unet.config.context_dim is None or not layers:
        raise ValueError("unet: IP-Adapter needs a UNet with cross-attention layers (unet.context_dim and "
                         "attention_resolutions)")
    return sorted(layers, key=lambda item: order.index(item[0].split(".")[0]))  # stable: module order within


def attach_ip_adapter(unet: UNetModel, weights: Mapping[str, torch.Tensor], scale: float = 1.0,
                      name: str = "ip_adapter") -> None:
    """Add a `KVStream` `name` holding a file's `ip_adapter` weights ({n}.to_k_ip.weight, {n}.to_v_ip.weight) to
    every cross-attention layer, in the layer's dtype and device; a ValueError naming the mismatch for another
    model's weights."""
    layers = cross_attention_layers(unet)
    if any(name in layer.streams for _, layer in layers):
        raise ValueError(f"name: an IP-Adapter {name!r} is attached already (detach_ip_adapter first)")
    numbers = sorted({int(key.split(".")[0]) for key in weights if key.split(".")[0].isdigit()})
    expected = [2 * i + 1 for i in range(len(layers))]
    if numbers != expected:
        raise ValueError(f"ip_adapter weights: numbered for {len(numbers)} cross-attention layers ({numbers[:3]}, "
                         f"...), this UNet has {len(layers)} (1, 3, ..., {expected[-1]}): an IP-Adapter for another "
                         "model?")
    unexpected = sorted(set(weights) - {f"{n}.{kind}.weight" for n in expected for kind in ("to_k_ip", "to_v_ip")})
    if unexpected:
        raise ValueError(f"ip_adapter weights: unexpected keys {unexpected[:3]} (expected n.to_k_ip.weight and "
                         "n.to_v_ip.weight only)")
    streams = []
    for (layer_name, layer), n in zip(layers, expected):
        tensors = {}
        for ours in ("to_k", "to_v"):
            key, own = f"{n}.{ours}_ip.weight", getattr(layer, ours).weight
            tensor = weights.get(key)
            if tensor is None or tensor.shape != own.shape:
                got = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
                raise ValueError(f"ip_adapter.{key} is {got}, but the UNet's {layer_name}.{ours}.weight is "
                                 f"{tuple(own.shape)} (inner, context): an IP-Adapter for another model?")
            tensors[f"{ours}.weight"] = tensor
        stream = KVStream(layer.to_k.in_features, layer.to_k.out_features, scale)
        stream.to(device=layer.to_k.weight.device, dtype=layer.to_k.weight.dtype).load_state_dict(tensors)
        streams.append((layer, stream))
    for layer, stream in streams:
        layer.streams[name] = stream


def _streams(unet: UNetModel, name: str) -> list[tuple[CrossAttention, KVStream]]:
    found = [(layer, layer.streams[name]) for _, layer in cross_attention_layers(unet) if name in layer.streams]
    if not found:
        raise ValueError(f"name: no IP-Adapter {name!r} is attached to this UNet")
    return found


def set_ip_adapter_scale(unet: UNetModel, scale: float, name: str = "ip_adapter") -> None:
    """Set λ, the weight of the image tokens' attention, in every layer of stream `name`."""
    for _, stream in _streams(unet, name):
        stream.scale = float(scale)


def ip_adapter_scale(unet: UNetModel, name: str = "ip_adapter") -> float:
    """λ of stream `name` (`set_ip_adapter_scale` sets every layer's alike)."""
    return _streams(unet, name)[0][1].scale


def detach_ip_adapter(unet: UNetModel, name: str = "ip_adapter") -> None:
    """Remove stream `name` from every cross-attention layer: the UNet is as before `attach_ip_adapter`."""
    for layer, _ in _streams(unet, name):
        del layer.streams[name]
