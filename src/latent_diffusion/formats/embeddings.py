"""Textual-inversion embedding files, as people share them: read (`read_embedding`) and written (`write_embedding`).

- **AUTOMATIC1111 `.pt`**: a pickled dict `{"string_to_token": {"*": 265}, "string_to_param": {"*": (N, D)},
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"}` (A1111 `modules/textual_inversion/textual_inversion.py`,
  `Embedding.save`); read with `torch.load(weights_only=True)`, so a file that would run code is refused.
- **AUTOMATIC1111 / kohya `.safetensors`**: `{"emb_params": (N, D)}` (kohya-ss sd-scripts
  `train_textual_inversion.py`, `save_weights`); SDXL's files hold `{"clip_l": (N, 768), "clip_g": (N, 1280)}`.
- **diffusers**: `learned_embeds.safetensors` / `.bin` holding `{token: (D,) or (N, D)}` (diffusers
  `examples/textual_inversion/textual_inversion.py`, `save_progress`; read by `loaders/textual_inversion.py`).

The trigger word is, unless given, the token a diffusers file stores, else the file's stem: A1111 names an
embedding after its file (`EmbeddingDatabase.load_from_file`), whatever its "name" field says.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from latent_diffusion.files.atomic import atomic_path
from latent_diffusion.files.weights import CheckpointError, load_pickle, load_weights, save_weights

A1111_KEY = "emb_params"  # the one tensor of an A1111 / kohya .safetensors embedding
A1111_STAR_TOKEN = 265  # CLIP's id of "*", which A1111's `Embedding.save` stores as `string_to_token`
SDXL_KEYS = ("clip_l", "clip_g")
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
EmbeddingFormat = Literal["a1111", "diffusers"]
SUFFIXES = {"a1111": (".safetensors", ".pt"), "diffusers": (".safetensors", ".bin")}


@dataclass(frozen=True)
class Embedding:
    """One trigger word and its N learned vectors.

    :param token: the trigger word that stands for the vectors in prompts.
    :param vectors: (N, D) float32, D the width of the text encoder it was trained for.
    :param source: the file it came from (for messages).
    """

    token: str
    vectors: torch.Tensor
    source: str = "embedding"


def embedding_file(path: str | os.PathLike) -> Path:
    """The file to read for `path`: itself, or in a folder diffusers' `learned_embeds.safetensors` / `.bin`."""
    path = Path(path)
    if path.is_dir():
        for name in DIFFUSERS_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir())[:8]
        raise CheckpointError(f"embedding folder {path} holds {', '.join(found) or 'nothing'}: expected "
                              f"{' or '.join(DIFFUSERS_FILES)}")
    if not path.is_file():
        raise CheckpointError(f"embedding file not found: {path}")
    return path


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """The embedding in an A1111 (`.pt`, `.safetensors`) or diffusers (`learned_embeds.*`, or their folder) file;
    `token` overrides the trigger word the file gives."""
    file = embedding_file(path)
    if file.suffix.lower() == ".safetensors":
        data: Any = load_weights(file)
    else:
        data = load_pickle(file)
    return embedding_from_state(data, file, token)


def embedding_from_state(data: Any, path: str | os.PathLike, token: str | None = None) -> Embedding:
    """The embedding in the contents `data` of the file `path` (a dict of tensors, or A1111's dict)."""
    path = Path(path)
    where = str(path)
    if isinstance(data, torch.Tensor):  # diffusers' loader takes a bare tensor too, with a token
        if token is None:
            raise CheckpointError(f"{where} holds a bare tensor with no trigger word: pass the token it stands for")
        return Embedding(_check_token(token, where), _vectors(data, where), where)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where} holds a {type(data).__name__}: expected an embedding's dict of tensors")
    if not data:
        raise CheckpointError(f"{where} holds no tensors: an empty embedding file")
    keys = list(data)
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            found = list(params) if isinstance(params, Mapping) else type(params).__name__
            raise CheckpointError(f"{where}: string_to_param holds {found}: expected one entry, '*' (an A1111 "
                                  "embedding of one trigger word)")
        return Embedding(_check_token(token or path.stem, where), _vectors(next(iter(params.values())), where), where)
    if all(k in data for k in SDXL_KEYS):
        raise CheckpointError(f"{where} is an SDXL embedding (clip_l and clip_g vectors, one set for each of SDXL's "
                              "two text encoders): this project has no SDXL model yet, so it cannot be loaded")
    if len(data) != 1:
        raise CheckpointError(f"{where} holds {len(keys)} entries ({', '.join(map(str, keys[:4]))}"
                              f"{', ...' if len(keys) > 4 else ''}): expected an A1111 embedding (string_to_param, "
                              f"or one tensor '{A1111_KEY}') or a diffusers one (one tensor under its token)")
    key, value = next(iter(data.items()))
    stored = None if key == A1111_KEY else str(key)  # kohya / A1111 safetensors name no token
    return Embedding(_check_token(token or stored or path.stem, where), _vectors(value, where), where)


def _vectors(value: Any, where: str) -> torch.Tensor:
    """(N, D) float32 vectors of a stored tensor (D,) or (N, D), checked."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{where}: the embedding's vectors are a {kind}: expected floating-point (N, D)")
    vectors = value.detach()[None] if value.ndim == 1 else value.detach()
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise CheckpointError(f"{where}: the embedding's vectors have shape {tuple(value.shape)}: expected (N, D) "
                              "or (D,)")
    vectors = vectors.to(torch.float32).clone()
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{where}: the embedding's vectors hold NaN or infinite values")
    return vectors


def _check_token(token: str, where: str) -> str:
    if not isinstance(token, str) or not token.strip():
        raise CheckpointError(f"{where}: the trigger word must be a non-blank string, got {token!r}")
    return token


def write_embedding(path: str | os.PathLike, token: str, vectors: torch.Tensor, fmt: EmbeddingFormat = "a1111",
                    step: int | None = None) -> Path:
    """Write `token`'s (N, D) `vectors` atomically in `fmt`, by the suffix of `path`: "a1111" as `.safetensors`
    (`emb_params`, as kohya writes and A1111 reads) or `.pt` (A1111's own dict, with `step`); "diffusers" as
    `.safetensors` or `.bin` (`{token: vectors}`, diffusers' `learned_embeds.*`). Returns the path."""
    path = Path(path)
    if fmt not in SUFFIXES:
        raise ValueError(f"fmt = {fmt!r}: expected one of {', '.join(SUFFIXES)}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES[fmt]:
        raise ValueError(f"{path}: a {fmt} embedding is written as {' or '.join(SUFFIXES[fmt])}")
    token = _check_token(token, str(path))
    vectors = _vectors(vectors, str(path)).cpu().contiguous()
    if suffix == ".safetensors":
        save_weights({A1111_KEY if fmt == "a1111" else token: vectors}, path, metadata={"format": "pt"})
    elif fmt == "a1111":
        _save_pickle({"string_to_token": {"*": A1111_STAR_TOKEN}, "string_to_param": {"*": vectors}, "name": token,
                      "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    else:
        _save_pickle({token: vectors}, path)
    return path


def _save_pickle(data: dict, path: Path) -> None:
    """`torch.save(data)` onto `path` atomically."""
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
