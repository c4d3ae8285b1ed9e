"""Textual-inversion embeddings on a pipeline's text encoder: `Pipeline.load_embedding` / `unload_embeddings`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from latent_diffusion.conditioning.base import FrozenEncoder
from latent_diffusion.conditioning.cache import CachedEncoder
from latent_diffusion.conditioning.embeddings import TOKEN_TABLES, add_embedding, remove_embeddings
from latent_diffusion.formats.embeddings import read_embedding

if TYPE_CHECKING:
    from latent_diffusion.pipeline import Pipeline


def text_encoder(pipe: Pipeline) -> FrozenEncoder:
    """The pipeline's frozen text encoder, with a clear error for a model that has none that takes embeddings."""
    encoder = getattr(pipe.conditioner, "encoder", None)
    if not isinstance(encoder, tuple(TOKEN_TABLES)):
        names = ", ".join(cls.__name__ for cls in TOKEN_TABLES)
        raise ValueError(f"this model's condition encoder is {type(encoder).__name__}: textual-inversion embeddings "
                        f"go into a text encoder ({names})")
    return encoder


def load_embedding(pipe: Pipeline, path: str | os.PathLike, token: str | None = None) -> str:
    """Read an embedding file (A1111 `.pt` / `.safetensors`, diffusers `learned_embeds.*`) and attach it to the
    pipeline's text encoder; returns its trigger word (`token`, else the file's)."""
    encoder = text_encoder(pipe)
    embedding = read_embedding(path, token)
    add_embedding(encoder, embedding.token, embedding.vectors, source=embedding.source)
    _refresh_cache(pipe)
    return embedding.token


def unload_embeddings(pipe: Pipeline) -> None:
    """Take every loaded embedding off the text encoder: prompts encode exactly as before."""
    remove_embeddings(text_encoder(pipe))
    _refresh_cache(pipe)


def _refresh_cache(pipe: Pipeline) -> None:
    """An on-disk cache of encoder outputs is keyed by the encoder's identity, which the vectors change: key it anew."""
    frozen = getattr(pipe.conditioner, "frozen", None)
    if isinstance(frozen, CachedEncoder):
        pipe.conditioner.cache_frozen(frozen.folder.parent)
