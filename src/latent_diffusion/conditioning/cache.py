"""An on-disk cache of text-encoder outputs: one safetensors file per (encoder identity, prompt); no pickle."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder, check_prompts
from latent_diffusion.files.weights import load_weights, save_weights


class CachedEncoder:
    """A frozen text encoder whose outputs are stored under `folder/<encoder identity>/<sha256(prompt)>.safetensors`.

    Same interface as the encoder: `cached(prompts) -> Conditioning`, `unconditional(batch_size)`, `dim`.
    """

    def __init__(self, encoder: FrozenEncoder, folder: str | os.PathLike):
        if not isinstance(encoder, FrozenEncoder):
            raise TypeError(f"only frozen text encoders can be cached, not {type(encoder).__name__} "
                            "(a trained encoder's outputs change during training)")
        self.encoder = encoder
        self.dim = encoder.dim
        self.folder = Path(folder) / encoder.identity()

    def path(self, prompt: str) -> Path:
        """The cache file of one prompt."""
        return self.folder / f"{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}.safetensors"

    def __call__(self, prompts: list[str]) -> Conditioning:
        prompts = check_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts) if not self.path(p).is_file()]
        if missing:
            encoded = self.encoder(missing)
            lengths = encoded.mask.int().cumsum(dim=1).argmax(dim=1) + 1  # up to the last real token
            for i, prompt in enumerate(missing):
                n = int(lengths[i])
                save_weights({"tokens": encoded.tokens[i, :n].cpu(), "mask": encoded.mask[i, :n].cpu()},
                             self.path(prompt), metadata={"prompt": prompt})
        rows = []
        for prompt in prompts:
            stored = load_weights(self.path(prompt))
            rows.append(Conditioning(stored["tokens"][None], stored["mask"][None]))
        return Conditioning.cat(rows).to(self.encoder.device)

    def unconditional(self, batch_size: int) -> Conditioning:
        """The null condition ∅ (the empty prompt), encoded directly."""
        return self.encoder.unconditional(batch_size)
