"""Class-label conditioning: a learned embedding per class plus one learned null label for classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from latent_diffusion.conditioning.base import Conditioning


class ClassEmbedder(nn.Module):
    """Labels (B,) → Conditioning(tokens (B, 1, dim), mask all True); label `num_classes` is the null label ∅.

    Trained with the denoising network (not frozen). The table is named `embedding` like CompVis' `ClassEmbedder`.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"expected num_classes >= 1 and dim >= 1, got {num_classes} and {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        """The index of the learned unconditional label."""
        return self.num_classes

    def forward(self, labels: torch.Tensor | Sequence[int]) -> Conditioning:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device)
        if labels.ndim != 1:
            raise ValueError(f"expected labels of shape (B,), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                             f"got values from {labels.min().item()} to {labels.max().item()}")
        tokens = self.embedding(labels)[:, None]  # (B, 1, D)
        return Conditioning(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def unconditional(self, batch_size: int) -> Conditioning:
        """The null condition ∅, `batch_size` times."""
        return self(torch.full((batch_size,), self.null_label, dtype=torch.long))
