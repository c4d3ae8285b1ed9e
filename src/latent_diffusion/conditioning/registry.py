"""Condition encoders by the name a config gives them ("minilm", "clip", "sdxl", "sd3", "class"): the one place a
new kind of `Conditioner` is registered (and named in `ConditioningConfig.encoder`, which validates the YAML)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from latent_diffusion.conditioning.classes import ClassConditioner
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.sd3 import SD3Conditioner
from latent_diffusion.conditioning.sdxl import SDXLConditioner
from latent_diffusion.conditioning.text import ClipConditioner, MiniLMConditioner
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ConditioningConfig, ConfigError
from latent_diffusion.files.weights import CheckpointError

CONDITIONERS: dict[str, type[Conditioner]] = {
    "minilm": MiniLMConditioner,
    "clip": ClipConditioner,
    "sdxl": SDXLConditioner,
    "sd3": SD3Conditioner,
    "class": ClassConditioner,
}


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def conditioner_type(name: str) -> type[Conditioner]:
    """The kind of condition encoder registered as `name`."""
    if name not in CONDITIONERS:
        raise ConfigError(f"unknown condition encoder '{name}'{_did_you_mean(name, CONDITIONERS)}; choose one of "
                          f"{', '.join(CONDITIONERS)}")
    return CONDITIONERS[name]


def build_conditioner(cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
                      text_weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
                      tokenizer: ClipTokenizer | None = None) -> Conditioner:
    """The condition encoder `cfg` describes, on `device` (see `Conditioner.build`); text encoder weights or a
    tokenizer for a kind that takes none are an error."""
    kind = conditioner_type(cfg.encoder)
    if (text_weights is not None or tokenizer is not None) and not kind.takes_text_weights:
        raise CheckpointError(f"text encoder weights given for a '{cfg.encoder}' model")
    return kind.build(cfg, device, context_dim, text_weights, dtype, tokenizer)


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """The network of the condition encoder registered as `name`, built with `kwargs` (e.g. `num_classes`, `dim`
    for "class")."""
    cls = conditioner_type(name).network
    parameters = inspect.signature(cls).parameters
    for key in kwargs:
        if key not in parameters:
            raise ConfigError(f"condition encoder '{name}' has no parameter '{key}'{_did_you_mean(key, parameters)}; "
                              f"its parameters: {', '.join(parameters)}")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"condition encoder '{name}': {exc}") from exc
    return cls(**kwargs)
