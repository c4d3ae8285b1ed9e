"""T5's encoder (SD3's third text encoder, T5-XXL v1.1): transformers' `T5EncoderModel` built from its `T5Config`
dictionary, and its SentencePiece tokenizer read from a `tokenizer.json` by the `tokenizers` library.

Weights use transformers' names (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...), the
layout of diffusers' `text_encoder_3/` and of SD3 single files under `text_encoders.t5xxl.transformer.`. The
input embedding is stored once, as `shared.weight` (transformers ties `encoder.embed_tokens` to it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.files.weights import CheckpointError, module_from_weights

TOKENIZER_FILE = "tokenizer.json"
SHARED, EMBED_TOKENS = "shared.weight", "encoder.embed_tokens.weight"
# what transformers' T5TokenizerFast reads beside tokenizer.json
_SPECIAL = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class T5Tokenizer:
    """Prompts → token ids (B, max_length): the pieces, then `</s>`, then `<pad>` (as transformers'
    `T5TokenizerFast(..., padding="max_length", truncation=True)`; longer prompts are cut before `</s>`)."""

    def __init__(self, tokenizer_json: str, max_length: int):
        from tokenizers import Tokenizer

        self.json, self.max_length = tokenizer_json, max_length
        self.backend = Tokenizer.from_str(tokenizer_json)
        pad = self.backend.token_to_id(_SPECIAL["pad_token"])
        if pad is None or self.backend.token_to_id(_SPECIAL["eos_token"]) is None:
            raise CheckpointError("a T5 tokenizer.json needs the tokens <pad> and </s>")
        self.backend.enable_truncation(max_length)
        self.backend.enable_padding(length=max_length, pad_id=pad, pad_token=_SPECIAL["pad_token"])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_length: int) -> T5Tokenizer:
        """The tokenizer of a folder with transformers' fast-tokenizer file (a diffusers `tokenizer_3/`)."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: a T5 tokenizer is read from its {TOKENIZER_FILE} (the fast "
                                  "tokenizer file; SentencePiece's spiece.model alone is not read)")
        return cls(path.read_text(encoding="utf-8"), max_length)

    def save_folder(self, folder: str | os.PathLike) -> None:
        """tokenizer.json and the configs transformers' `T5TokenizerFast` reads, atomically."""
        folder = Path(folder)
        atomic_write_bytes(folder / TOKENIZER_FILE, self.json.encode())
        atomic_write_bytes(folder / "special_tokens_map.json", json.dumps(_SPECIAL, indent=2).encode())
        config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
                  "additional_special_tokens": [], **_SPECIAL}
        atomic_write_bytes(folder / "tokenizer_config.json", json.dumps(config, indent=2).encode())

    def with_length(self, max_length: int) -> T5Tokenizer:
        return T5Tokenizer(self.json, max_length)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([e.ids for e in self.backend.encode_batch(list(prompts))], dtype=torch.long)


def t5_config(config: Mapping[str, Any]):
    """transformers' `T5Config` of a config dictionary (a text_encoder_3/config.json), as an encoder alone."""
    from transformers import T5Config

    known = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",
                                                                                 "transformers_version")}
    return T5Config(**{**known, "is_encoder_decoder": False, "use_cache": False})


def t5_weights(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """`T5EncoderModel` weights with the input embedding stored once, as `shared.weight`."""
    out = dict(tensors)
    embed = out.pop(EMBED_TOKENS, None)
    if SHARED not in out:
        if embed is None:
            raise CheckpointError(f"{what}: neither {SHARED} nor {EMBED_TOKENS} (T5's input embedding) is present")
        out[SHARED] = embed
    return out


def t5_encoder(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | None,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A `T5EncoderModel` of `config` holding `weights` (random without: tests only), in eval mode."""
    from transformers import T5EncoderModel

    cfg = t5_config(config)
    if weights is None:
        model = T5EncoderModel(cfg).to(dtype)
    else:
        tensors = t5_weights(weights, "T5 encoder weights")
        tensors[EMBED_TOKENS] = tensors[SHARED]
        model = module_from_weights(lambda: T5EncoderModel(cfg), tensors, "T5 encoder weights", dtype)
    for module in model.modules():
        # transformers' feed-forward casts its input to `wo`'s dtype before calling it: weights kept in bf16 and
        # cast layer by layer for fp32 math (`inference.precision.store_weights`) must be cast for it as one
        if type(module).__name__ in ("T5DenseGatedActDense", "T5DenseActDense"):
            module.cast_as_one = True
    return model.eval()
