"""Textual inversion (Gal et al. 2022): learned vectors for new trigger words, attached to a frozen text encoder
from outside.

A trigger word (`<my-thing>`) in a prompt becomes N tokens, and the token-embedding rows at those positions are
replaced by the trigger's N vectors; everything after the token table runs as before. The encoder's tokenizer is
swapped for one that knows the triggers, and its token table gets two hooks: the forward pre-hook lets the table
look up a harmless id at the trigger positions (the ids past the vocabulary would index out of it), and the forward
hook puts the vectors there. The vectors live in a `TokenVectors` module attached to the encoder as
`encoder.token_vectors`, so they follow the encoder to its device and are part of its state dict and so of its
`identity()` (caches never mix), and `remove_embeddings` gives back the encoder exactly as it was.

The same happens in AUTOMATIC1111 (`modules/sd_hijack.py`: `EmbeddingsWithFixes` overwrites the rows of the token
embedding's output where `EmbeddingDatabase.find_embedding_at_position` found an embedding's ids) and in diffusers
(`loaders/textual_inversion.py`: tokens `t`, `t_1` … `t_{N-1}` added to the tokenizer, the prompt's `t` rewritten
to all N by `maybe_convert_prompt`, the token table resized and the new rows set).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from latent_diffusion.conditioning.base import FrozenEncoder
from latent_diffusion.conditioning.clip import ClipTextEncoder
from latent_diffusion.conditioning.minilm import MiniLMEncoder
from latent_diffusion.conditioning.tokenizer import clean_text

ATTRIBUTE = "token_vectors"  # where the vectors hang on the encoder
A1111_INIT_TEXT = "*"  # AUTOMATIC1111's `create_embedding` starts from the embedding of "*" when given no init text
KNOWN_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL's second text encoder", 384: "MiniLM"}


class ClipTokens:
    """Our CLIP tokenizer and `ClipTextTransformer`: added tokens standing for several ids each (SD 1.x, SD 2.x)."""

    @staticmethod
    def table(encoder: ClipTextEncoder) -> nn.Embedding:
        return encoder.transformer.embeddings.token_embedding

    @staticmethod
    def word_ids(tokenizer: Any, text: str) -> list[int]:
        return tokenizer.encode(text)

    @staticmethod
    def with_triggers(encoder: ClipTextEncoder, tokenizer: Any, counts: Mapping[str, int]
                      ) -> tuple[Any, dict[str, list[int]]]:
        first = max(len(tokenizer.vocab), ClipTokens.table(encoder).num_embeddings)  # ids no real token has
        ids, start = {}, first
        for trigger, n in counts.items():
            ids[trigger], start = list(range(start, start + n)), start + n
        return tokenizer.with_added_tokens(ids), ids


class HuggingFaceTokens:
    """A transformers model and its tokenizer (MiniLM's BERT). As diffusers does (`maybe_convert_prompt`), each
    trigger in a text is rewritten to N added tokens before the tokenizer runs; here they are matched as written
    (`normalized=False`), so the tokenizer's normaliser cannot change them, and the trigger itself is matched
    case-insensitively, as CLIP's lower-casing matches it."""

    @staticmethod
    def table(encoder: MiniLMEncoder) -> nn.Embedding:
        return encoder.model.get_input_embeddings()

    @staticmethod
    def word_ids(tokenizer: Any, text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def with_triggers(encoder: MiniLMEncoder, tokenizer: Any, counts: Mapping[str, int]
                      ) -> tuple[Any, dict[str, list[int]]]:
        from tokenizers import AddedToken

        extended = copy.deepcopy(tokenizer)
        names = {trigger: [f"<|{trigger}|{i}|>" for i in range(n)] for trigger, n in counts.items()}
        extended.add_tokens([AddedToken(name, normalized=False) for group in names.values() for name in group])
        ids = {trigger: extended.convert_tokens_to_ids(group) for trigger, group in names.items()}
        return TriggerRewriter(extended, {trigger: " ".join(group) for trigger, group in names.items()}), ids


class TriggerRewriter:
    """A Hugging Face tokenizer whose calls see each trigger of `expansions` replaced by its expansion (one pass,
    longest trigger first, case-insensitive); every other attribute is the tokenizer's."""

    def __init__(self, tokenizer: Any, expansions: Mapping[str, str]):
        self.tokenizer = tokenizer
        self.expansions = {trigger.lower(): text for trigger, text in expansions.items()}
        alternatives = "|".join(re.escape(t) for t in sorted(expansions, key=len, reverse=True))
        self.pattern = re.compile(alternatives, re.IGNORECASE)

    def rewrite(self, text: str) -> str:
        return self.pattern.sub(lambda m: self.expansions[m.group(0).lower()], text)

    def __call__(self, text: str | list[str], *args: Any, **kwargs: Any) -> Any:
        texts = self.rewrite(text) if isinstance(text, str) else [self.rewrite(t) for t in text]
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "tokenizer":  # copy/pickle probes, and before __init__ ran
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


TOKEN_TABLES: dict[type, Any] = {ClipTextEncoder: ClipTokens, MiniLMEncoder: HuggingFaceTokens}


def _kind(encoder: FrozenEncoder) -> Any:
    for cls, kind in TOKEN_TABLES.items():
        if isinstance(encoder, cls):
            return kind
    raise TypeError(f"textual inversion works on the text encoders {', '.join(c.__name__ for c in TOKEN_TABLES)}, "
                    f"not {type(encoder).__name__}")


class TokenVectors(nn.Module):
    """The vectors of the trigger words attached to one text encoder; made and attached by `add_embedding`.

    `vectors` holds one (N, D) parameter per trigger, under the trigger's UTF-8 bytes in hex (state-dict names may
    not hold dots), so the triggers themselves are part of the encoder's state dict and identity.
    """

    def __init__(self, encoder: FrozenEncoder):
        super().__init__()
        self.vectors = nn.ParameterDict()
        self.kind = _kind(encoder)
        self.original_tokenizer = encoder.tokenizer
        self.ids: dict[str, list[int]] = {}
        self._triggers: dict[str, str] = {}  # parameter name -> trigger, in the order they were added
        self._positions: torch.Tensor | None = None  # the pre-hook's ids for the hook
        table = self.kind.table(encoder)
        self._hooks = [table.register_forward_pre_hook(self._mask_ids), table.register_forward_hook(self._put_vectors)]

    @property
    def triggers(self) -> list[str]:
        return list(self._triggers.values())

    def vectors_of(self, trigger: str) -> nn.Parameter:
        """The (N, D) parameter of `trigger`."""
        return self.vectors[_key(trigger)]

    def rebuild(self, encoder: FrozenEncoder) -> None:
        """Give `encoder` a tokenizer that knows the current triggers and refresh their ids."""
        counts = {trigger: self.vectors[key].shape[0] for key, trigger in self._triggers.items()}
        encoder.tokenizer, self.ids = self.kind.with_triggers(encoder, self.original_tokenizer, counts)

    def detach_from(self, encoder: FrozenEncoder) -> None:
        for hook in self._hooks:
            hook.remove()
        encoder.tokenizer = self.original_tokenizer

    def _mask_ids(self, table: nn.Embedding, args: tuple) -> tuple | None:
        ids = args[0]
        added = torch.tensor([i for group in self.ids.values() for i in group], device=ids.device)
        mask = torch.isin(ids, added)
        self._positions = ids if mask.any() else None
        return (ids.masked_fill(mask, 0),) + args[1:] if self._positions is not None else None

    def _put_vectors(self, table: nn.Embedding, args: tuple, rows: torch.Tensor) -> torch.Tensor | None:
        ids, self._positions = self._positions, None
        if ids is None:
            return None
        added = [i for trigger in self._triggers.values() for i in self.ids[trigger]]
        vectors = torch.cat([self.vectors[key] for key in self._triggers])  # (K, D), in the order of `added`
        slot = torch.full((max(added) + 1,), -1, dtype=torch.long, device=ids.device)
        slot[torch.tensor(added, device=ids.device)] = torch.arange(len(added), device=ids.device)
        where = slot[ids.clamp(max=max(added))]  # (B, N): row of `vectors`, -1 where a real token is
        picked = vectors[where.clamp(min=0)].to(rows.dtype)  # (B, N, D)
        return torch.where((where >= 0)[..., None], picked, rows)  # (B, N, D)


def _key(trigger: str) -> str:
    return trigger.encode("utf-8").hex()


def token_vectors(encoder: FrozenEncoder) -> TokenVectors | None:
    """The vectors attached to `encoder`, or None."""
    return getattr(encoder, ATTRIBUTE, None)


def embedding_width(encoder: FrozenEncoder) -> int:
    """The width D of `encoder`'s token embeddings, which every attached vector must have."""
    return _kind(encoder).table(encoder).embedding_dim


def check_width(vectors: torch.Tensor, encoder: FrozenEncoder, source: str = "the embedding") -> None:
    """A clear error when `vectors` (N, D) do not fit `encoder`: wrong width, say for which models either is."""
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not vectors.is_floating_point():
        raise ValueError(f"{source}: expected floating-point vectors (N >= 1, D), got {vectors.dtype} "
                         f"{tuple(vectors.shape)}")
    have, want = vectors.shape[1], embedding_width(encoder)
    if have != want:
        raise ValueError(f"{source}: a {have}-wide embedding{_models(have)} for a {want}-wide text encoder"
                         f"{_models(want)}: an embedding works only with the kind of text encoder it was trained for")


def _models(width: int) -> str:
    """The models of that width in brackets, e.g. " (SD 1.x)", when they are known; else nothing."""
    return f" ({KNOWN_WIDTHS[width]})" if width in KNOWN_WIDTHS else ""


def initial_vectors(encoder: FrozenEncoder, num_vectors: int, init_text: str | None = A1111_INIT_TEXT
                    ) -> torch.Tensor:
    """(num_vectors, D) starting vectors: the token embeddings of `init_text` spread over them (vector i takes the
    token at i·T // N of its T tokens, as AUTOMATIC1111's `create_embedding` does; one token fills all, as
    diffusers' `textual_inversion.py` does with its single `initializer_token`), or zeros for None."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors = {num_vectors}: expected at least 1")
    kind = _kind(encoder)
    table = kind.table(encoder)
    if init_text is None:
        return torch.zeros(num_vectors, table.embedding_dim, device=table.weight.device)
    attached = token_vectors(encoder)
    tokenizer = attached.original_tokenizer if attached is not None else encoder.tokenizer
    ids = kind.word_ids(tokenizer, init_text)
    if not ids:
        raise ValueError(f"init_word {init_text!r} has no tokens: give a word the text encoder knows")
    with torch.no_grad():
        rows = table.weight[torch.tensor(ids, device=table.weight.device)].float()  # (T, D)
    return rows[[i * len(ids) // num_vectors for i in range(num_vectors)]].clone()


def add_embedding(encoder: FrozenEncoder, token: str, vectors: torch.Tensor | None = None, *, num_vectors: int = 1,
                  init_word: str | None = A1111_INIT_TEXT, trainable: bool = False,
                  source: str = "the embedding") -> nn.Parameter:
    """Attach `token` to `encoder` with `vectors` (N, D), or with `num_vectors` made by `initial_vectors(init_word)`;
    returns the (N, D) parameter (fp32, on the encoder's device; `requires_grad` = `trainable`). Train it through
    `encoder.encode(prompts)`, which runs with autograd; `source` names the vectors in errors."""
    if not isinstance(token, str) or not clean_text(token):
        raise ValueError(f"the trigger word must be a non-blank string, got {token!r}")
    attached = token_vectors(encoder)
    if attached is not None and token in attached.triggers:
        raise ValueError(f"an embedding for {token!r} is already loaded; remove it first (remove_embedding)")
    if vectors is None:
        vectors = initial_vectors(encoder, num_vectors, init_word)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    check_width(vectors, encoder, source)
    if attached is None:
        attached = TokenVectors(encoder)
        encoder.add_module(ATTRIBUTE, attached)
    table = attached.kind.table(encoder)
    parameter = nn.Parameter(vectors.detach().to(table.weight.device, torch.float32).clone(), requires_grad=trainable)
    attached.vectors[_key(token)] = parameter
    attached._triggers[_key(token)] = token
    attached.rebuild(encoder)
    return parameter


def remove_embedding(encoder: FrozenEncoder, token: str) -> None:
    """Take `token`'s vectors off `encoder`; with the last one the encoder is exactly as before the first."""
    attached = token_vectors(encoder)
    if attached is None or token not in attached.triggers:
        raise KeyError(f"no embedding for {token!r} is loaded (loaded: {attached.triggers if attached else []})")
    del attached.vectors[_key(token)]
    del attached._triggers[_key(token)]
    if attached.triggers:
        attached.rebuild(encoder)
    else:
        remove_embeddings(encoder)


def remove_embeddings(encoder: FrozenEncoder) -> None:
    """Take every attached vector off `encoder`: its tokenizer, token table and state dict are as they were."""
    attached = token_vectors(encoder)
    if attached is not None:
        attached.detach_from(encoder)
        delattr(encoder, ATTRIBUTE)


def embeddings(encoder: FrozenEncoder) -> dict[str, nn.Parameter]:
    """The attached vectors by trigger word: (N, D) parameters, those `add_embedding(trainable=True)` made trainable."""
    attached = token_vectors(encoder)
    return {trigger: attached.vectors_of(trigger) for trigger in attached.triggers} if attached else {}
