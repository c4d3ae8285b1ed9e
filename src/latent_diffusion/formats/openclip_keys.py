"""The text encoders inside Stable Diffusion files ↔ our `ClipTextTransformer`: explicit key maps with shape asserts.

SD 1.x stores CLIP ViT-L/14 in transformers' names (ours, behind `cond_stage_model.transformer.text_model.`).
SD 2.x stores OpenCLIP ViT-H/14's text tower under `cond_stage_model.model.`: q/k/v fused into
`attn.in_proj_weight` (3·width, width), `ln_1/ln_2`, `mlp.c_fc/c_proj`, `ln_final`, plus the contrastive head
(`text_projection`, `logit_scale`) that conditioning never reads. SD 2.x conditions on the penultimate block's
output followed by `ln_final` (`FrozenOpenCLIPEmbedder(layer="penultimate")`), so its files hold one block
more than the conditioning uses; our `ClipTextConfig(layer="penultimate")` keeps that block and skips it too.
"""

from __future__ import annotations

import math
import re

import torch

from latent_diffusion.config import ClipTextConfig
from latent_diffusion.files.weights import CheckpointError

OPENCLIP_PREFIX = "cond_stage_model.model."
HEAD_CHANNELS = 64  # CLIP and OpenCLIP text towers: heads = width / 64 (ViT-L/14: 12, ViT-H/14: 16)
LAYER_NORM_EPS = 1e-5
OPENCLIP_PAD_TOKEN_ID = 0
# Written in place of the contrastive head, which `ModelParts` does not keep: an identity projection and
# OpenCLIP's initial temperature log(1/0.07). Stable Diffusion never reads either.
PLACEHOLDER_LOGIT_SCALE = math.log(1 / 0.07)

_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_CONTRASTIVE_HEAD = ("text_projection", "logit_scale")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _expect(value: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(value.shape) != shape:
        raise CheckpointError(f"{OPENCLIP_PREFIX}{name} has shape {tuple(value.shape)}, expected {shape}")


def openclip_to_clip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `ClipTextTransformer` weights from OpenCLIP text-tower tensors (names without the prefix)."""
    if "token_embedding.weight" not in tensors:
        raise CheckpointError(f"the OpenCLIP text encoder has no {OPENCLIP_PREFIX}token_embedding.weight")
    width = tensors["token_embedding.weight"].shape[1]
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name in _TOP:
            out[_TOP[name]] = value
        elif (match := _RESBLOCK.fullmatch(name)) is not None:
            out.update(_block_to_clip(f"encoder.layers.{match[1]}", match[2], value, width, name))
        elif name not in _CONTRASTIVE_HEAD:
            raise CheckpointError(f"unexpected OpenCLIP text encoder key {OPENCLIP_PREFIX}{name}")
    return out


def _block_to_clip(ours: str, rest: str, value: torch.Tensor, width: int, name: str) -> dict[str, torch.Tensor]:
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.removeprefix("attn.in_proj_")
        _expect(value, (3 * width, width) if kind == "weight" else (3 * width,), name)
        q, k, v = value.chunk(3, dim=0)  # OpenCLIP's in_proj stacks [W_q; W_k; W_v]
        return {f"{ours}.self_attn.{p}_proj.{kind}": t.clone() for p, t in (("q", q), ("k", k), ("v", v))}
    module, _, param = rest.rpartition(".")
    if module not in _BLOCK or param not in ("weight", "bias"):
        raise CheckpointError(f"unexpected OpenCLIP text encoder key {OPENCLIP_PREFIX}{name}")
    return {f"{ours}.{_BLOCK[module]}.{param}": value}


def clip_to_openclip(tensors: dict[str, torch.Tensor], cfg: ClipTextConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (no prefix) of our weights; a `layer="last"` model gains an identity block."""
    out = {theirs: tensors[ours] for theirs, ours in _TOP.items()}
    for i in range(cfg.layers):
        ours, theirs = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            fused = [tensors[f"{ours}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{theirs}.attn.in_proj_{kind}"] = torch.cat(fused, dim=0)
            for module, name in _BLOCK.items():
                out[f"{theirs}.{module}.{kind}"] = tensors[f"{ours}.{name}.{kind}"]
    ref = tensors["final_layer_norm.weight"]
    if cfg.layer == "last":
        out.update(identity_block(cfg.layers, cfg.width, cfg.mlp_width, ref))
    out["text_projection"] = torch.eye(cfg.width, dtype=ref.dtype, device=ref.device)
    out["logit_scale"] = torch.tensor(PLACEHOLDER_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
    return out


def identity_block(index: int, width: int, mlp_width: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """OpenCLIP block `index` that returns its input exactly: zero attention output and zero MLP output."""
    def zeros(*shape):
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def ones(*shape):
        return torch.ones(shape, dtype=like.dtype, device=like.device)

    params = {"ln_1.weight": ones(width), "ln_1.bias": zeros(width),
              "attn.in_proj_weight": zeros(3 * width, width), "attn.in_proj_bias": zeros(3 * width),
              "attn.out_proj.weight": zeros(width, width), "attn.out_proj.bias": zeros(width),
              "ln_2.weight": ones(width), "ln_2.bias": zeros(width),
              "mlp.c_fc.weight": zeros(mlp_width, width), "mlp.c_fc.bias": zeros(mlp_width),
              "mlp.c_proj.weight": zeros(width, mlp_width), "mlp.c_proj.bias": zeros(width)}
    return {f"transformer.resblocks.{index}.{name}": value for name, value in params.items()}


def infer_clip_config(tensors: dict[str, torch.Tensor], openclip: bool,
                      layer: str | None = None) -> ClipTextConfig:
    """The text transformer's architecture from our-named weights; OpenCLIP implies gelu, pad id 0, penultimate."""
    vocab_size, width = tensors["embeddings.token_embedding.weight"].shape
    layers = 1 + max((int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layers.")), default=-1)
    if layers == 0:
        raise CheckpointError("the text encoder has no transformer blocks (encoder.layers.* / resblocks.*)")
    if openclip:
        style = {"hidden_act": "gelu", "layer": layer or "penultimate", "pad_token_id": OPENCLIP_PAD_TOKEN_ID}
    else:
        style = {"hidden_act": "quick_gelu", "layer": layer or "last", "pad_token_id": None}
    return ClipTextConfig(vocab_size=vocab_size, width=width, layers=layers, heads=max(1, width // HEAD_CHANNELS),
                          mlp_width=tensors["encoder.layers.0.mlp.fc1.weight"].shape[0],
                          max_positions=tensors["embeddings.position_embedding.weight"].shape[0],
                          layer_norm_eps=LAYER_NORM_EPS, eos_token_id=vocab_size - 1, **style)


def check_writable(cfg: ClipTextConfig) -> None:
    """Raise unless a reader infers `cfg` (or its equivalent) back from an SD 1.x (quick_gelu) / 2.x (gelu) file."""
    openclip = cfg.hidden_act == "gelu"
    sd1_pad = (None, cfg.eos_token_id)  # SD 1.x pads with the end token, however it is spelled
    expected = {"heads": (max(1, cfg.width // HEAD_CHANNELS),), "layer_norm_eps": (LAYER_NORM_EPS,),
                "eos_token_id": (cfg.vocab_size - 1,),
                "pad_token_id": (OPENCLIP_PAD_TOKEN_ID,) if openclip else sd1_pad}
    wrong = [f"{k} = {getattr(cfg, k)!r} (expected {' or '.join(map(repr, v))})" for k, v in expected.items()
             if getattr(cfg, k) not in v]
    if wrong:
        layout = "SD 2.x OpenCLIP (gelu)" if openclip else "SD 1.x CLIP (quick_gelu)"
        raise CheckpointError(f"this text encoder cannot be stored as an {layout} text encoder: "
                              + "; ".join(wrong))
