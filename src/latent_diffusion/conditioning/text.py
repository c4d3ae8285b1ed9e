"""Text conditioning: a frozen pretrained text encoder (MiniLM or CLIP), optionally followed by a trained
`ContextAdapter` (`conditioning.adapter_layers`); captions and prompts are encoded alike, ∅ is the empty prompt."""

from __future__ import annotations

import copy
import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from latent_diffusion.conditioning.adapter import ContextAdapter
from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder
from latent_diffusion.conditioning.cache import CachedEncoder
from latent_diffusion.conditioning.clip import ClipTextEncoder
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.dropout import drop_condition
from latent_diffusion.conditioning.minilm import MiniLMEncoder
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ConditioningConfig, ConfigError


class TextConditioner(Conditioner):
    """`encoder` (frozen) → tokens → `adapter` (trained, when the model has one) → Conditioning.

    `frozen` computes the frozen tokens: the encoder itself, or its on-disk cache (`cache_frozen`).
    """

    trained_part = "text adapter"

    def __init__(self, cfg: ConditioningConfig, encoder: FrozenEncoder, adapter: ContextAdapter | None = None):
        self.cfg, self.encoder, self.adapter = cfg, encoder, adapter
        self.dim: int = encoder.dim
        self.frozen: FrozenEncoder | CachedEncoder = encoder

    @classmethod
    @abstractmethod
    def text_encoder(cls, cfg: ConditioningConfig, text_weights: Mapping[str, torch.Tensor] | None,
                     dtype: torch.dtype, tokenizer: ClipTokenizer | None) -> FrozenEncoder:
        """The frozen encoder `cfg` describes (on the CPU)."""

    @classmethod
    def build(cls, cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
              text_weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
              tokenizer: ClipTokenizer | None = None) -> TextConditioner:
        encoder = cls.text_encoder(cfg, text_weights, dtype, tokenizer)
        adapter = ContextAdapter(encoder.dim, cfg.adapter_layers).to(device) if cfg.adapter_layers else None
        return cls(cfg, encoder.to(device), adapter)

    @property
    def trainable(self) -> nn.Module | None:
        return self.adapter

    def with_trainable(self, module: nn.Module) -> TextConditioner:
        changed = copy.copy(self)
        changed.adapter = module
        return changed

    def adapt(self, cond: Conditioning) -> Conditioning:
        """The adapter applied to frozen text tokens (identity without one)."""
        return cond if self.adapter is None else self.adapter(cond)

    def encode_items(self, items: Sequence[dict]) -> Conditioning:
        return self.adapt(self.frozen([item["caption"] for item in items]))

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return self.adapt(self.frozen(list(prompts)))

    def unconditional(self, batch_size: int) -> Conditioning:
        return self.adapt(self.frozen.unconditional(batch_size))

    def training_inputs(self, items: Sequence[dict], drop: torch.Tensor) -> Conditioning:
        """The frozen tokens of the captions, the empty prompt's where `drop` (the adapter runs in the model)."""
        return drop_condition(self.frozen([item["caption"] for item in items]), self.frozen.unconditional(1), drop)

    def label_prompt(self, label: int, caption: str) -> str:
        return caption

    def cache_frozen(self, folder: str | os.PathLike) -> None:
        self.frozen = CachedEncoder(self.encoder, folder)


class MiniLMConditioner(TextConditioner):
    """Frozen all-MiniLM-L6-v2 tokens (`minilm.py`): config name "minilm"."""

    network = MiniLMEncoder

    @classmethod
    def text_encoder(cls, cfg: ConditioningConfig, text_weights: Mapping[str, torch.Tensor] | None,
                     dtype: torch.dtype, tokenizer: ClipTokenizer | None) -> MiniLMEncoder:
        return MiniLMEncoder(max_length=cfg.max_length, model_path=cfg.path, clause_tokens=cfg.clause_tokens)


class ClipConditioner(TextConditioner):
    """Frozen CLIP text tokens, as Stable Diffusion 1.x/2.x conditions (`clip.py`): config name "clip". Its
    weights come with a checkpoint or from `conditioning.path`, and are kept in the pipeline's storage dtype."""

    network = ClipTextEncoder
    takes_text_weights = True
    stores_in_dtype = True

    @classmethod
    def text_encoder(cls, cfg: ConditioningConfig, text_weights: Mapping[str, torch.Tensor] | None,
                     dtype: torch.dtype, tokenizer: ClipTokenizer | None) -> ClipTextEncoder:
        return ClipTextEncoder(config=cfg.clip, weights=cfg.path if text_weights is None else text_weights,
                               tokenizer=tokenizer, dtype=dtype)

    @classmethod
    def check_trainable(cls, cfg: ConditioningConfig) -> None:
        if cfg.path is None:
            raise ConfigError("conditioning.encoder = 'clip' with no conditioning.path: the CLIP text encoder would "
                              "have random weights, and the UNet would learn to follow noise. Set conditioning.path "
                              "to CLIP text weights (a .safetensors file of CLIPTextModel weights, or a whole SD 1.x "
                              "checkpoint), or use encoder 'minilm' (pretrained, installed as a package)")
