"""Class-label conditioning: a class embedder trained with the UNet; a prompt names its class, ∅ is the null label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.class_embedder import ClassEmbedder
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ConditioningConfig


class ClassConditioner(Conditioner):
    """Labels → `ClassEmbedder` (the encoder, trained) → Conditioning(one token per label): config name "class"."""

    network = ClassEmbedder
    trained_part = "class embedder"
    needs_captions = False

    def __init__(self, cfg: ConditioningConfig, embedder: ClassEmbedder):
        self.cfg, self.encoder = cfg, embedder
        self.dim: int = embedder.dim

    @classmethod
    def build(cls, cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
              text_weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
              tokenizer: ClipTokenizer | None = None) -> ClassConditioner:
        if cfg.num_classes is None or context_dim is None:
            raise ValueError("conditioning.encoder = 'class' needs conditioning.num_classes and unet.context_dim")
        return cls(cfg, ClassEmbedder(cfg.num_classes, context_dim).to(device))

    @property
    def trainable(self) -> ClassEmbedder:
        return self.encoder

    def with_trainable(self, module: ClassEmbedder) -> ClassConditioner:
        return ClassConditioner(self.cfg, module)

    def encode_items(self, items: Sequence[dict]) -> Conditioning:
        return self.encoder([item["label"] for item in items])

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The conditions of the classes the prompts name (`class_label`); the empty prompt is ∅ (the null label),
        as for text models."""
        return self.encoder([class_label(p, self.cfg) if p.strip() else self.encoder.null_label for p in prompts])

    def unconditional(self, batch_size: int) -> Conditioning:
        return self.encoder.unconditional(batch_size)

    def training_inputs(self, items: Sequence[dict], drop: torch.Tensor) -> torch.Tensor:
        """The items' labels (B,), the null label where `drop` (the embedder runs in the model)."""
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return labels.masked_fill(drop.to(labels.device), self.encoder.null_label)

    def label_prompt(self, label: int, caption: str) -> str:
        return str(label)


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
