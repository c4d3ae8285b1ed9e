"""SD3's condition encoder (Esser et al. 2024, §5.2): CLIP ViT-L, OpenCLIP ViT-bigG and T5-XXL, all frozen.

- tokens (B, 77 + n, D_T5): the two CLIP encoders' penultimate states (no final LayerNorm) concatenated along the
  width (768 + 1280), zero-padded to T5's width (4096), followed along the sequence by T5's n = t5_max_length
  states (T5 reads its padded tokens without a mask, as diffusers and the reference code do). Without T5, its
  part is n zero tokens (diffusers' `text_encoder_3=None`).
- vector (B, 2048): the two CLIP encoders' projected pooled outputs, concatenated.
- ∅ is the empty prompt through all three, as diffusers' pipeline encodes its default negative prompt ""; training
  drops captions to it.

Weights: `SD3TextEncoder`'s state dict holds `clip.*` and `clip_2.*` in `ClipTextTransformer`'s names and `t5.*` in
transformers' `T5EncoderModel` names (`conditioning.t5`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder, check_prompts, split_prefixed
from latent_diffusion.conditioning.clip import clip_text_transformer
from latent_diffusion.conditioning.t5 import T5Tokenizer, t5_encoder
from latent_diffusion.conditioning.text import TextConditioner
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ClipTextConfig, ConditioningConfig, ConfigError
from latent_diffusion.files.weights import CheckpointError, read_weights

CLIP_NAMES = ("clip", "clip_2")
PARTS = (*CLIP_NAMES, "t5")  # the encoders' prefixes in the weights


@dataclass(frozen=True)
class SD3Tokenizers:
    """SD3's vocabularies: CLIP's BPE (both CLIP encoders; each pads with its own id) and T5's SentencePiece."""

    clip: ClipTokenizer
    t5: T5Tokenizer | None

    def save_folder(self, folder: str | os.PathLike) -> None:
        """CLIP's vocabulary in `folder`, T5's in `folder/t5/` (a model folder's `tokenizer/`)."""
        self.clip.save_folder(folder)
        if self.t5 is not None:
            self.t5.save_folder(Path(folder) / "t5")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, cfg: ConditioningConfig) -> SD3Tokenizers:
        """What `save_folder` wrote (CLIP's vocabulary defaults to the bundled one)."""
        folder = Path(folder)
        if cfg.t5 is not None and not (folder / "t5").is_dir():
            raise CheckpointError(f"{folder / 't5'} is missing: this SD3 model's T5 encoder needs its tokenizer")
        clip = ClipTokenizer.from_folder(folder) if (folder / "vocab.json").is_file() else ClipTokenizer.from_bpe_file()
        t5 = T5Tokenizer.from_folder(folder / "t5", cfg.t5_max_length) if (folder / "t5").is_dir() else None
        return cls(clip, t5)


def split_weights(weights: Mapping[str, torch.Tensor], what: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"clip": ..., "clip_2": ..., "t5": ...} of the prefixed weights."""
    return split_prefixed(weights, PARTS, what)


class SD3TextEncoder(FrozenEncoder):
    """Frozen SD3 text encoders: prompts → Conditioning(tokens (B, 77 + n, context_dim), mask all True, vector).

    :param cfg: the model's conditioning (`clip`, `clip_2`, `t5`, `t5_max_length`).
    :param context_dim: the token width (the MMDiT's context_dim: T5's d_model).
    :param weights: our-named weights (`clip.*`, `clip_2.*`, `t5.*`), or a .safetensors file of them; None leaves
        them random (tests only).
    :param tokenizers: the vocabularies (default: the bundled CLIP one; T5 has no default).
    """

    def __init__(self, cfg: ConditioningConfig, context_dim: int,
                 weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
                 tokenizers: SD3Tokenizers | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if weights is not None and not isinstance(weights, Mapping):
            weights = read_weights(weights, dtype)
        parts = None if weights is None else split_weights(weights, "SD3 text encoder weights")
        self.configs: dict[str, ClipTextConfig] = {name: getattr(cfg, name) for name in CLIP_NAMES}
        clip_vocabulary = tokenizers.clip if tokenizers is not None else ClipTokenizer.from_bpe_file()
        self.tokenizers: dict[str, ClipTokenizer] = {}
        for name, config in self.configs.items():
            setattr(self, name, clip_text_transformer(config, None if parts is None else parts.get(name, {}), dtype))
            self.tokenizers[name] = ClipTokenizer(clip_vocabulary.vocab, clip_vocabulary.merges,
                                                  config.max_positions, config.pad_token_id)
        self.t5_config, self.t5_length = cfg.t5, cfg.t5_max_length
        if cfg.t5 is not None:
            if tokenizers is None or tokenizers.t5 is None:
                raise CheckpointError("this SD3 model's T5 encoder needs its tokenizer (a tokenizer.json, as in a "
                                      "diffusers SD3 folder's tokenizer_3/)")
            if parts is not None and "t5" not in parts:
                raise CheckpointError("SD3 text encoder weights: the T5 encoder's (t5.*) are missing")
            self.t5 = t5_encoder(cfg.t5, None if parts is None else parts["t5"], dtype)
            self.t5_tokenizer = tokenizers.t5.with_length(cfg.t5_max_length)
        elif parts is not None and "t5" in parts:
            raise CheckpointError("SD3 text encoder weights hold a T5 encoder, but conditioning.t5 is null")
        clip_width = sum(c.width for c in self.configs.values())
        if clip_width > context_dim:
            raise ConfigError(f"the CLIP encoders' states are {clip_width} wide, more than the context width "
                              f"{context_dim} they are padded to")
        self.dim = context_dim
        self.pooled_dim = sum(c.projection_dim for c in self.configs.values())
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        prompts = check_prompts(prompts)
        states, pooled = [], []
        for name in CLIP_NAMES:
            input_ids = self.tokenizers[name](prompts).to(self.device)  # (B, 77)
            hidden, vector = getattr(self, name)(input_ids, return_pooled=True)  # (B, 77, D_i), (B, P_i)
            states.append(hidden)
            pooled.append(vector)
        clip = F.pad(torch.cat(states, dim=-1), (0, self.dim - sum(s.shape[-1] for s in states)))  # (B, 77, D)
        if self.t5_config is not None:
            t5 = self.t5(input_ids=self.t5_tokenizer(prompts).to(self.device)).last_hidden_state  # (B, n, D)
        else:
            t5 = clip.new_zeros(len(prompts), self.t5_length, self.dim)
        tokens = torch.cat([clip, t5.to(clip.dtype)], dim=1)  # (B, 77 + n, D)
        return Conditioning(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                            vector=torch.cat(pooled, dim=-1))

    def settings(self) -> dict[str, Any]:
        return {"configs": self.configs, "t5": self.t5_config, "vocab": len(self.tokenizers["clip"].vocab),
                "t5_tokenizer": None if self.t5_config is None else self.t5_tokenizer.json}


class SD3Conditioner(TextConditioner):
    """SD3's three text encoders (module docstring): config name "sd3". Nothing is trained with the MMDiT; the
    weights come with a checkpoint or from `conditioning.path`."""

    network = SD3TextEncoder
    takes_text_weights = True
    stores_in_dtype = True

    @classmethod
    def build(cls, cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
              text_weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
              tokenizer: SD3Tokenizers | None = None) -> SD3Conditioner:
        if cfg.adapter_layers:
            raise ConfigError("conditioning.adapter_layers: an 'sd3' model has no text adapter")
        if context_dim is None:
            raise ConfigError("an 'sd3' condition encoder needs the network's context_dim (T5's width)")
        if tokenizer is None and text_weights is None and cfg.path is not None:
            tokenizer = SD3Tokenizers.from_folder(Path(cfg.path).parent / "tokenizer", cfg)  # a model folder's
        encoder = SD3TextEncoder(cfg, context_dim, cfg.path if text_weights is None else text_weights, tokenizer,
                                 dtype)
        return cls(cfg, encoder.to(device))

    @classmethod
    def text_encoder(cls, cfg, text_weights, dtype, tokenizer):
        raise NotImplementedError("SD3Conditioner.build builds its encoder")

    @classmethod
    def check_trainable(cls, cfg: ConditioningConfig) -> None:
        if cfg.path is None:
            raise ConfigError("conditioning.encoder = 'sd3' with no conditioning.path: the text encoders would have "
                              "random weights. Set conditioning.path to an SD3 model folder's "
                              "text_encoder.safetensors (`ldm convert` writes one from an SD3 checkpoint; its "
                              "tokenizer/ folder beside it is read too)")

    @property
    def vector_dim(self) -> int:
        """The width of the vector condition: the two pooled CLIP outputs."""
        return self.encoder.pooled_dim

    def cache_frozen(self, folder: str | os.PathLike) -> None:
        raise ConfigError("conditioning.cache: an 'sd3' model's conditions are not cached (its vector condition "
                          "would be lost)")
