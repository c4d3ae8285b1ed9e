"""Condition encoders by name, as a config names them: "minilm", "clip" or "class"."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from latent_diffusion.conditioning.class_embedder import ClassEmbedder
from latent_diffusion.conditioning.clip import ClipTextEncoder
from latent_diffusion.conditioning.minilm import MiniLMEncoder
from latent_diffusion.config import ConfigError

ENCODERS: dict[str, type[nn.Module]] = {
    "minilm": MiniLMEncoder,
    "clip": ClipTextEncoder,
    "class": ClassEmbedder,
}


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """The condition encoder registered as `name`, built with `kwargs` (e.g. `num_classes`, `dim` for "class")."""
    if name not in ENCODERS:
        close = difflib.get_close_matches(name, ENCODERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown condition encoder '{name}'{hint}; choose one of {', '.join(ENCODERS)}")
    cls = ENCODERS[name]
    parameters = inspect.signature(cls).parameters
    for key in kwargs:
        if key not in parameters:
            close = difflib.get_close_matches(key, parameters, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"condition encoder '{name}' has no parameter '{key}'{hint}; "
                              f"its parameters: {', '.join(parameters)}")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"condition encoder '{name}': {exc}") from exc
    return cls(**kwargs)
