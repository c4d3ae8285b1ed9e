"""A model's condition encoder behind one interface: dataset items, prompts and ∅ in, a `Conditioning` out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from latent_diffusion.conditioning.adapter import ContextAdapter
from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.registry import build_encoder
from latent_diffusion.config import ConditioningConfig


class Conditioner:
    """The condition encoder of a model, with one interface for captions, class labels and prompts.

    `encoder` is the frozen text encoder or the class embedder; `adapter` (text models with
    `conditioning.adapter_layers`) is the trained `ContextAdapter` applied to the encoder's tokens.
    """

    def __init__(self, cfg: ConditioningConfig, encoder: torch.nn.Module, adapter: ContextAdapter | None = None):
        self.cfg, self.encoder, self.adapter = cfg, encoder, adapter
        self.dim: int = encoder.dim

    @property
    def trainable(self) -> torch.nn.Module | None:
        """The module trained with the UNet (the class embedder or the adapter), or None."""
        return self.encoder if self.cfg.encoder == "class" else self.adapter

    def adapt(self, cond: Conditioning) -> Conditioning:
        """The adapter applied to frozen text tokens (identity without one)."""
        return cond if self.adapter is None else self.adapter(cond)

    def encode_items(self, items: Sequence[dict], adapt: bool = True) -> Conditioning:
        """Conditions of dataset items ({'caption': str, 'label': int}); `adapt=False`: the frozen tokens."""
        if self.cfg.encoder == "class":
            return self.encoder([item["label"] for item in items])
        cond = self.encoder([item["caption"] for item in items])
        return self.adapt(cond) if adapt else cond

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditions of user prompts; a class-conditional model's prompt names its class (`class_label`)."""
        if self.cfg.encoder != "class":
            return self.adapt(self.encoder(list(prompts)))
        return self.encoder([class_label(p, self.cfg) for p in prompts])

    def unconditional(self, batch_size: int, adapt: bool = True) -> Conditioning:
        """∅, `batch_size` times; `adapt=False`: a text model's frozen tokens of the empty prompt."""
        cond = self.encoder.unconditional(batch_size)
        return self.adapt(cond) if adapt and self.cfg.encoder != "class" else cond


def class_label(prompt: str, cfg: ConditioningConfig) -> int:
    """The label a class-conditional model's prompt asks for: its number, or the longest class name it contains
    ("a photo of a t-shirt" is a t-shirt, not a shirt)."""
    text = prompt.strip().lower()
    if text.isdigit() and int(text) < cfg.num_classes:
        return int(text)
    names = cfg.class_names or ()
    found = [(len(name), label) for label, name in enumerate(names) if name.lower() in text]
    if not found:
        known = f"a class name ({', '.join(names)}) or " if names else ""
        raise ValueError(f"this model is class-conditional: the prompt must be {known}a label number 0 to "
                         f"{cfg.num_classes - 1}, got {prompt!r}")
    return max(found)[1]


def build_conditioner(cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
                      text_weights: Mapping[str, torch.Tensor] | None = None,
                      dtype: torch.dtype = torch.float32) -> Conditioner:
    """The configured encoder on `device` (`context_dim` sizes a class embedder's tokens); a CLIP text encoder
    holds `text_weights` (None: those at `cfg.path`) in `dtype`."""
    if cfg.encoder == "class":
        if cfg.num_classes is None or context_dim is None:
            raise ValueError("conditioning.encoder = 'class' needs conditioning.num_classes and unet.context_dim")
        encoder = build_encoder("class", num_classes=cfg.num_classes, dim=context_dim)
    elif cfg.encoder == "minilm":
        encoder = build_encoder("minilm", max_length=cfg.max_length, model_path=cfg.path,
                                clause_tokens=cfg.clause_tokens)
    else:
        encoder = build_encoder("clip", config=cfg.clip, weights=cfg.path if text_weights is None else text_weights,
                                dtype=dtype)
    adapter = ContextAdapter(encoder.dim, cfg.adapter_layers).to(device) if cfg.adapter_layers else None
    return Conditioner(cfg, encoder.to(device), adapter)


def trained_part(cfg: ConditioningConfig) -> str:
    return "class embedder" if cfg.encoder == "class" else "text adapter"
