"""The condition encoder protocol: what every kind of τ_θ offers the pipeline, the trainer and the model formats,
so that none of them asks which kind it has.

A new kind (dual text encoders, image prompts, ...) is one subclass of `Conditioner`, registered by its config
name in `registry.py`. The kinds today: `text.py` (a frozen MiniLM or CLIP text encoder, optionally followed by a
trained adapter) and `classes.py` (a trained class embedder).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ConditioningConfig


class Conditioner(ABC):
    """A model's condition encoder τ_θ: dataset items, prompts and ∅ in, a `Conditioning` out.

    `encoder` is its network (a frozen text encoder, a class embedder) and `dim` its token width. `trainable` is
    the module trained with the UNet, or None: training runs it inside the model it optimises, on
    `training_inputs`, so that its gradients are reduced with the UNet's; everything frozen runs outside.
    """

    network: ClassVar[type[nn.Module]]  # the class of `encoder` (`registry.build_encoder` builds it by name)
    trained_part: ClassVar[str] = "trained conditioner"  # what `trainable` is called in messages
    takes_text_weights: ClassVar[bool] = False  # its text encoder's weights come with a model (a checkpoint's)
    stores_in_dtype: ClassVar[bool] = False  # `build` keeps the frozen encoder's weights in `dtype` (math in fp32)
    needs_captions: ClassVar[bool] = True  # it reads dataset items' captions (training data must have some)

    cfg: ConditioningConfig
    encoder: nn.Module
    dim: int

    @classmethod
    @abstractmethod
    def build(cls, cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
              text_weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
              tokenizer: ClipTokenizer | None = None) -> Conditioner:
        """The encoder `cfg` describes, on `device`; `context_dim` is the UNet's token width; a pretrained text
        encoder holds `text_weights` (None: those `cfg.path` names) and `tokenizer` (None: its own)."""

    @classmethod
    def check_trainable(cls, cfg: ConditioningConfig) -> None:
        """Refuse, before any work, a configuration that would train the UNet against an untrained encoder."""

    @property
    @abstractmethod
    def trainable(self) -> nn.Module | None:
        """The module trained with the UNet (`training_inputs` → `Conditioning`), or None."""

    @abstractmethod
    def with_trainable(self, module: nn.Module) -> Conditioner:
        """The same encoder with `module` as its trained part (e.g. the EMA weights, to sample with)."""

    @abstractmethod
    def encode_items(self, items: Sequence[dict]) -> Conditioning:
        """Conditions of dataset items ({'caption': str, 'label': int})."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditions of user prompts."""

    @abstractmethod
    def unconditional(self, batch_size: int) -> Conditioning:
        """The null condition ∅ for classifier-free guidance, `batch_size` times."""

    def encode_request(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
                       size: tuple[int, int], micro: Mapping[str, Any] | None = None
                       ) -> tuple[Conditioning, Conditioning]:
        """(the prompts' conditions, ∅ or the negative prompts') of a request for images of `size` (height, width);
        `micro` holds a model's own request conditions by name (SDXL's sizes, crop and aesthetic scores), which
        a model without them refuses."""
        given = sorted(k for k, v in (micro or {}).items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)}: only SDXL models take micro-conditioning (this model's condition "
                             f"encoder is '{self.cfg.encoder}')")
        cond = self.encode_prompts(prompts)
        uncond = (self.encode_prompts(negative_prompts) if negative_prompts is not None
                  else self.unconditional(len(prompts)))
        return cond, uncond

    @abstractmethod
    def training_inputs(self, items: Sequence[dict], drop: torch.Tensor) -> Any:
        """What `trainable` takes for dataset `items`, ∅'s where `drop` (B,) is True (CFG training), computed
        outside the trained model; the `Conditioning` itself when nothing is trained."""

    @abstractmethod
    def label_prompt(self, label: int, caption: str) -> str:
        """The prompt that asks this model for a sample of dataset label `label`, whose caption is `caption`."""

    def cache_frozen(self, folder: str | os.PathLike) -> None:
        """Keep what the frozen part computes for each caption on disk under `folder` (nothing to keep here)."""
