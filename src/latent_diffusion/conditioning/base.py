"""What every condition encoder τ_θ returns (a `Conditioning`), and the base of the frozen pretrained ones."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latent_diffusion.files.weights import CheckpointError


@dataclass(frozen=True, eq=False)
class Conditioning:
    """τ_θ(y): context tokens for cross-attention and which of them are real.

    :param tokens: (B, L, D) context vectors.
    :param mask: (B, L) bool, True at real tokens, False at padding (whose tokens are zero).
    :param extra: tokens (B, L', D') of the cross-attention layers' extra streams by name (IP-Adapter's image
        tokens; `nn.attention.KVStream`), none for the paper's model.
    :param vector: (B, D_v) a vector condition added to the UNet's timestep embedding (SDXL: the pooled text
        embedding and the size/crop Fourier features; `unet.adm_in_channels`), None for the paper's model.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)
    vector: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(f"expected tokens (B, L, D) and a bool mask (B, L), got tokens {tuple(self.tokens.shape)} "
                             f"and mask {tuple(self.mask.shape)} {self.mask.dtype}")
        wrong = {name: tuple(t.shape) for name, t in self.extra.items() if t.ndim != 3 or len(t) != len(self.tokens)}
        if wrong:
            raise ValueError(f"expected extra tokens (B={len(self.tokens)}, L, D) for every stream, got {wrong}")
        if self.vector is not None and (self.vector.ndim != 2 or len(self.vector) != len(self.tokens)):
            raise ValueError(f"expected a vector condition (B={len(self.tokens)}, D), got {tuple(self.vector.shape)}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to `device`; `dtype` casts the tokens only (the mask stays bool)."""
        return Conditioning(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                            {name: t.to(device=device, dtype=dtype) for name, t in self.extra.items()},
                            None if self.vector is None else self.vector.to(device=device, dtype=dtype))

    def with_extra(self, name: str, tokens: torch.Tensor) -> Conditioning:
        """The same condition with `tokens` (B, L', D') for the extra stream `name`."""
        return Conditioning(self.tokens, self.mask, {**self.extra, name: tokens}, self.vector)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch, padding shorter sequences with zero tokens and False mask entries; extra
        streams and the vector condition must be in every item or in none (each concatenated as it is)."""
        length = max(c.tokens.shape[1] for c in items)
        tokens = [nn.functional.pad(c.tokens, (0, 0, 0, length - c.tokens.shape[1])) for c in items]
        masks = [nn.functional.pad(c.mask, (0, length - c.mask.shape[1]), value=False) for c in items]
        names = set(items[0].extra)
        if any(set(c.extra) != names for c in items):
            raise ValueError(f"conditions with different extra streams: {[sorted(c.extra) for c in items]}")
        extra = {name: torch.cat([c.extra[name] for c in items]) for name in names}
        vectors = [c.vector for c in items if c.vector is not None]
        if vectors and len(vectors) != len(items):
            raise ValueError("conditions with and without a vector condition cannot be batched together")
        return Conditioning(torch.cat(tokens), torch.cat(masks), extra, torch.cat(vectors) if vectors else None)


class FrozenEncoder(nn.Module):
    """Base of pretrained text encoders: always in eval mode, no gradients; subclasses run under `torch.no_grad`.

    Subclasses set `dim` and implement `forward(prompts) -> Conditioning` and `settings()`.
    """

    dim: int

    def freeze(self) -> None:
        """Eval mode (dropout off) and `requires_grad=False` on every parameter."""
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever a parent module asks (a frozen encoder never trains)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def unconditional(self, batch_size: int) -> Conditioning:
        """The null condition ∅ for classifier-free guidance: the empty prompt, `batch_size` times."""
        empty = self([""])
        return Conditioning(empty.tokens.repeat(batch_size, 1, 1), empty.mask.repeat(batch_size, 1),
                            vector=None if empty.vector is None else empty.vector.repeat(batch_size, 1))

    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that changes the output (for `identity`)."""
        raise NotImplementedError

    def identity(self) -> str:
        """A hash of class, settings and weights: two encoders with the same identity encode alike."""
        digest = hashlib.sha256(type(self).__name__.encode())
        digest.update(json.dumps(self.settings(), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

def split_prefixed(tensors: Mapping[str, torch.Tensor], names: Sequence[str], what: str
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """{name: its tensors without the `name.` prefix} of weights that hold several encoders (SDXL's, SD3's)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        if name not in names:
            raise CheckpointError(f"{what}: unexpected key {key!r} (expected {', '.join(n + '.*' for n in names)})")
        parts.setdefault(name, {})[rest] = value
    return parts


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A list of prompt strings; a bare string is an error (it would be read as one prompt per character)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"expected a list of prompt strings, got {type(prompts).__name__}"
                        + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else ""))
    return list(prompts)
