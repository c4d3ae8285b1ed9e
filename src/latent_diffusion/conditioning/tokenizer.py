"""CLIP's byte-level BPE tokenizer, offline: text -> (B, 77) token ids as Stable Diffusion 1.x feeds its text encoder.

Follows OpenAI's `simple_tokenizer.py` with the text clean-up of Hugging Face's `CLIPTokenizer` (which SD 1.x used):
NFC normalisation, runs of whitespace to one space, lower case; no ftfy, no HTML unescaping.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import os
import tempfile
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import regex
import tokenizers
import torch

from latent_diffusion.files.atomic import atomic_write_bytes

# OpenAI's CLIP vocabulary (MIT), as shipped in the open_clip_torch wheel (MIT); see conditioning/__init__.py.
DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 49152 - 256 - 2  # merges CLIP uses from the 16e6 file: 49408 tokens = 2·256 bytes + merges + 2 specials

VOCAB_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FOLDER_FILES = ("vocab.json with merges.txt (what transformers 4 saves) or tokenizer.json (what "
                          "transformers 5 saves)")

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_WHITESPACE = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(c) for byte, c in zip(printable, chars)}


def clean_text(text: str) -> str:
    """NFC-normalise, collapse whitespace to single spaces, strip and lower-case."""
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


def read_vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, ...]]]:
    """The vocabulary and merges of a folder's `vocab.json` and `merges.txt` (with or without `#version`)."""
    vocab = json.loads((folder / VOCAB_FILES[0]).read_text(encoding="utf-8"))
    lines = (folder / VOCAB_FILES[1]).read_text(encoding="utf-8").split("\n")
    return vocab, [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, ...]]]:
    """The vocabulary and merges of a `tokenizers` file (`tokenizer.json`) holding CLIP's byte-level BPE."""
    try:
        model = tokenizers.Tokenizer.from_file(str(path)).model
    except Exception as exc:  # tokenizers raises a bare Exception for an unreadable or malformed file
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(model, tokenizers.models.BPE) or model.end_of_word_suffix != END_OF_WORD:
        suffix = getattr(model, "end_of_word_suffix", None)
        raise ValueError(f"{path} holds a {type(model).__name__} model with end_of_word_suffix {suffix!r}: "
                         f"expected CLIP's byte-level BPE (a BPE model with end_of_word_suffix {END_OF_WORD!r})")
    with tempfile.TemporaryDirectory() as tmp:  # the BPE model gives its merges only by saving them
        model.save(tmp)
        return read_vocab_and_merges(Path(tmp))


class ClipTokenizer:
    """CLIP's byte-level BPE: prompts -> (B, context_length) ids, `<|startoftext|>` ... `<|endoftext|>`, padded.

    :param vocab: token string -> id (49408 entries for CLIP).
    :param merges: BPE merges in priority order (the first merges first).
    :param context_length: sequence length of the text encoder (77 for CLIP).
    :param pad_id: the padding id; None pads with the end token (OpenAI CLIP, SD 1.x), OpenCLIP (SD 2.x) pads with 0.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77,
                 pad_id: int | None = None):
        for special in (START_TOKEN, END_TOKEN):
            if special not in vocab:
                raise ValueError(f"the vocabulary has no {special} token")
        if context_length < 2:
            raise ValueError(f"context_length = {context_length}: expected at least 2 (start and end tokens)")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.context_length = context_length
        self.start_id = self.vocab[START_TOKEN]
        self.end_id = self.vocab[END_TOKEN]
        self.pad_id = self.end_id if pad_id is None else pad_id
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._cache: dict[str, list[str]] = {START_TOKEN: [START_TOKEN], END_TOKEN: [END_TOKEN]}
        self.added_tokens: dict[str, tuple[int, ...]] = {}
        self._added_pattern: regex.Pattern | None = None
        self._added_text: dict[int, str] = {}

    def with_added_tokens(self, added: Mapping[str, Sequence[int]]) -> ClipTokenizer:
        """A copy of this tokenizer in which each text of `added` stands for its ids (one or several) wherever it
        appears: the text is split on them before BPE, as Hugging Face tokenizers split on their added tokens, and
        they are matched in the cleaned (lower-cased) text. The vocabulary and merges are shared, not copied."""
        tokens = {clean_text(text): tuple(int(i) for i in ids) for text, ids in added.items()}
        if any(not text or not ids for text, ids in tokens.items()):
            raise ValueError(f"added tokens need a non-blank text and at least one id each, got {dict(added)}")
        extended = object.__new__(ClipTokenizer)
        extended.__dict__.update(self.__dict__)
        extended.added_tokens = tokens
        alternatives = "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True))  # longest first
        extended._added_pattern = regex.compile(f"({alternatives})") if tokens else None
        extended._added_text = {ids[0]: text for text, ids in tokens.items()}
        extended._added_text.update({i: "" for ids in tokens.values() for i in ids[1:]})
        return extended

    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike = DEFAULT_BPE_PATH, context_length: int = 77,
                      pad_id: int | None = None) -> ClipTokenizer:
        """Build CLIP's 49408-token vocabulary from OpenAI's gzipped merges file (`bpe_simple_vocab_16e6.txt.gz`)."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
        return cls({token: i for i, token in enumerate(tokens)}, merges, context_length, pad_id)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, context_length: int = 77,
                    pad_id: int | None = None) -> ClipTokenizer:
        """Load a Hugging Face / diffusers tokenizer folder: `vocab.json` + `merges.txt`, else `tokenizer.json`."""
        folder = Path(folder)
        if all((folder / name).is_file() for name in VOCAB_FILES):
            return cls(*read_vocab_and_merges(folder), context_length, pad_id)
        if (folder / TOKENIZER_JSON).is_file():
            return cls(*read_tokenizer_json(folder / TOKENIZER_JSON), context_length, pad_id)
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"tokenizer folder {folder} holds {', '.join(found) or 'nothing'}: expected "
                                f"{TOKENIZER_FOLDER_FILES}")

    def save_folder(self, folder: str | os.PathLike) -> None:
        """Write `vocab.json` and `merges.txt` (the Hugging Face / diffusers layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "vocab.json", json.dumps(self.vocab, ensure_ascii=False).encode("utf-8"))
        merges = "\n".join(f"{a} {b}" for a, b in self.merges)
        atomic_write_bytes(folder / "merges.txt", f"#version: 0.2\n{merges}\n".encode())

    def encode(self, text: str) -> list[int]:
        """BPE token ids of `text`, without start/end tokens and without truncation."""
        text = clean_text(text)
        pieces = self._added_pattern.split(text) if self._added_pattern else [text]
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:  # split() with one group puts the matched added tokens at the odd places
                ids += self.added_tokens[piece]
                continue
            for word in _PATTERN.findall(piece):
                for bpe in self._bpe("".join(self._byte_encoder[b] for b in word.encode("utf-8"))):
                    if bpe not in self.vocab:
                        raise KeyError(f"BPE piece {bpe!r} is not in the vocabulary (vocab and merges do not match)")
                    ids.append(self.vocab[bpe])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens included as written), words separated by single spaces."""
        text = bytearray()
        for i in ids:
            if int(i) in self._added_text:
                text += self._added_text[int(i)].encode("utf-8") + (b" " if self._added_text[int(i)] else b"")
                continue
            token = self._id_to_token[int(i)]
            text += bytes(self._byte_decoder[c] for c in token.removesuffix(END_OF_WORD))
            if token.endswith(END_OF_WORD):
                text += b" "
        return text.decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, context_length): start, BPE tokens, end, then `pad_id` as padding; over-long prompts cut."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        room = self.context_length - 2
        rows = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                cut = self.decode(ids[room:])
                warnings.warn(f"prompt {i} has {len(ids)} tokens but the text encoder takes {room}: "
                              f"{len(ids) - room} tokens were cut ({cut if len(cut) <= 60 else cut[:57] + '...'!r})",
                              stacklevel=2)
                ids = ids[:room]
            row = [self.start_id] + ids + [self.end_id]
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one pre-token, lowest merge rank first, the last one marked end-of-word."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = set(itertools.pairwise(parts))
            best = min(pairs, key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts
