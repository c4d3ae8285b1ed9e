"""CLIP's text transformer (Stable Diffusion 1.x's τ_θ: the CLIP ViT-L/14 text tower) and its frozen encoder.

Module names mirror Hugging Face's `CLIPTextModel` (`embeddings.token_embedding`, `encoder.layers.{i}.self_attn.q_proj`,
`final_layer_norm` ...), the layout inside SD 1.x checkpoints under `cond_stage_model.transformer.text_model.`,
so weights load with no renaming.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder, check_prompts
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ClipTextConfig, ConfigError, from_dict
from latent_diffusion.files.weights import (CheckpointError, load_module_weights, load_weights, module_from_weights,
                                           read_weights)

SD1_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."


class ClipAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (Hugging Face names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, D/H)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, D/H)
        return self.out_proj(h.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class ClipMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.hidden_act = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.hidden_act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class ClipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.self_attn = ClipAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg.width, cfg.mlp_width, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))  # (B, N, D)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, N, D)


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.layers))


class ClipTextTransformer(nn.Module):
    """Token ids (B, N ≤ max_positions) → hidden states (B, N, width) of `config.layer` (final LayerNorm applied
    unless `config.final_norm` is False), and on request the pooled output (projected by `text_projection` when
    the config has one: transformers' `CLIPTextModelWithProjection`)."""

    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.encoder = ClipEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, return_pooled: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of `config.layer`; with `return_pooled`, also the last layer's states (B, width) at the
        first end token after the final LayerNorm, through `text_projection` where there is one (B, projection)."""
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_positions:
            raise ValueError(f"expected token ids (B, N <= {cfg.max_positions}), got shape {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids)  # (B, N, D)
        num_layers = cfg.layers - 1 if cfg.layer == "penultimate" else cfg.layers
        for block in self.encoder.layers[:num_layers]:
            x = block(x)
        states = self.final_layer_norm(x) if cfg.final_norm else x  # (B, N, D)
        if not return_pooled:
            return states
        for block in self.encoder.layers[num_layers:]:  # the pooled output reads the last layer
            x = block(x)
        eos = (input_ids == cfg.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = self.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), eos])  # (B, D)
        if cfg.projection_dim is not None:
            pooled = self.text_projection(pooled)  # (B, projection_dim)
        return states, pooled


def clip_text_tensors(state_dict: Mapping[str, torch.Tensor], what: str = "CLIP text weights"
                      ) -> dict[str, torch.Tensor]:
    """Hugging Face `CLIPTextModel` weights under our names: keys with or without the `text_model.` prefix."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":  # a constant arange buffer in older transformers files
            continue
        if name in tensors:
            raise CheckpointError(f"{what}: '{name}' appears both with and without the 'text_model.' prefix")
        tensors[name] = value
    return tensors


def load_clip_text_state_dict(model: ClipTextTransformer, state_dict: Mapping[str, torch.Tensor],
                              what: str = "CLIP text weights") -> None:
    """Load Hugging Face `CLIPTextModel` weights, keys with or without the `text_model.` prefix; strict."""
    load_module_weights(model, clip_text_tensors(state_dict, what), what)


def clip_text_transformer(cfg: ClipTextConfig, weights: str | os.PathLike | Mapping[str, torch.Tensor] | None,
                          dtype: torch.dtype = torch.float32) -> ClipTextTransformer:
    """A `ClipTextTransformer` holding `weights` (as `ClipTextEncoder` takes them) in `dtype`, built on the meta
    device: no random weights are drawn first, and tensors already in `dtype` are used, not copied."""
    if weights is None:
        return ClipTextTransformer(cfg).to(dtype)
    what = "CLIP text weights" if isinstance(weights, Mapping) else str(weights)
    tensors = weights if isinstance(weights, Mapping) else _read_text_weights(weights, dtype)
    return module_from_weights(lambda: ClipTextTransformer(cfg), clip_text_tensors(tensors, what), what, dtype)


def _read_text_weights(path: str | os.PathLike, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The `CLIPTextModel` weights of a file of them or of a whole SD 1.x checkpoint, read in `dtype`."""
    sd1 = any(k.startswith(SD1_TEXT_ENCODER_PREFIX) for k in load_weights(path))  # memory-mapped: names only
    tensors = read_weights(path, dtype, keys=lambda k: not sd1 or k.startswith(SD1_TEXT_ENCODER_PREFIX))
    if not sd1:
        return tensors
    return {k.removeprefix(SD1_TEXT_ENCODER_PREFIX): v for k, v in tensors.items()
            if k.startswith(SD1_TEXT_ENCODER_PREFIX)}


class ClipTextEncoder(FrozenEncoder):
    """Frozen CLIP text encoder: prompts → Conditioning(tokens (B, 77, width), mask all True), as SD 1.x conditions.

    :param config: a `ClipTextConfig` (or its dictionary); default CLIP ViT-L/14.
    :param weights: `CLIPTextModel` weights: a state dict, a safetensors file of them, or a whole SD 1.x
        checkpoint (its `cond_stage_model.transformer.` keys are used); None leaves the weights random (tests only).
    :param tokenizer: default: the bundled CLIP vocabulary.
    :param dtype: the dtype the weights are held in (a state dict's tensors already in it are used, not copied).
    """

    def __init__(self, config: ClipTextConfig | dict[str, Any] | None = None,
                 weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
                 tokenizer: ClipTokenizer | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        config = from_dict(ClipTextConfig, config, "clip") if isinstance(config, dict) else config
        self.config = config or ClipTextConfig()
        self.tokenizer = tokenizer or ClipTokenizer.from_bpe_file(context_length=self.config.max_positions,
                                                                  pad_id=self.config.pad_token_id)
        if self.tokenizer.context_length > self.config.max_positions:
            raise ConfigError(f"tokenizer context_length {self.tokenizer.context_length} exceeds the text "
                              f"transformer's max_positions {self.config.max_positions}")
        self.transformer = clip_text_transformer(self.config, weights, dtype)
        self.dim = self.config.width
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        return self.encode(prompts)

    def encode(self, prompts: list[str]) -> Conditioning:
        """`forward` with autograd on, for vectors attached from outside that are trained (the weights stay frozen)."""
        input_ids = self.tokenizer(check_prompts(prompts)).to(self.device)  # (B, 77)
        tokens = self.transformer(input_ids)  # (B, 77, D)
        return Conditioning(tokens, torch.ones(input_ids.shape, dtype=torch.bool, device=tokens.device))

    def settings(self) -> dict[str, Any]:
        return {"config": self.config, "vocab": len(self.tokenizer.vocab), "merges": len(self.tokenizer.merges)}
