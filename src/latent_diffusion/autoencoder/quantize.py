"""Vector quantisation, the paper's other first-stage regulariser (VQGAN's `VectorQuantizer2`, van den Oord et al.
2017): each latent vector is replaced by its nearest codebook entry, gradients pass straight through.

The codebook learns either by its loss term ‖z_q − sg[z]‖² (straight-through), or by exponential moving averages of
the vectors assigned to each entry (`ema_decay`; then only the commitment term β‖sg[z_q] − z‖² is a loss). Entries
no vector has chosen for `restart_after` training steps are set to vectors of the current batch (dead-code restarts).
Code usage and perplexity come with every call. The codebook is `embedding.weight` (n_embed, dim), CompVis' key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    """What one quantisation gives: z_q (straight-through in training), the codebook/commitment loss, the chosen
    entries (B, h, w), the perplexity of their distribution and the share of entries used."""

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VectorQuantizer(nn.Module):
    """z (B, dim, h, w) → nearest of `n_embed` codebook vectors, per position."""

    def __init__(self, n_embed: int, dim: int, beta: float = 0.25, ema_decay: float | None = None,
                 restart_after: int | None = None):
        super().__init__()
        if n_embed < 2 or dim < 1:
            raise ValueError(f"VectorQuantizer: n_embed = {n_embed}, dim = {dim}: expected n_embed >= 2, dim >= 1")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"model.vq_ema_decay = {ema_decay}: expected a number in (0, 1), e.g. 0.99")
        self.n_embed, self.dim, self.beta = n_embed, dim, beta
        self.ema_decay, self.restart_after = ema_decay, restart_after
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1 / n_embed, 1 / n_embed)  # taming's initialisation
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
        # training statistics, not part of a model file (CompVis checkpoints have none): made at the first training
        # step from the codebook as it is then (so a loaded or resumed model starts them afresh)
        for name in ("cluster_size", "embed_sum", "idle_steps"):
            self.register_buffer(name, torch.zeros(0), persistent=False)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry of each row of `flat` (N, dim), by ‖z‖² − 2 z·e + ‖e‖²."""
        codebook = self.embedding.weight.float()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)[None]
        return distances.argmin(1)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The codebook vectors of indices (B, h, w), as latents (B, dim, h, w)."""
        return self.embedding(indices).float().permute(0, 3, 1, 2)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, dim, h, w) with each vector replaced by its nearest code: no loss, no learning (decoding)."""
        b, c, h, w = z.shape
        return self.codes(self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c).float()).view(b, h, w)).to(z.dtype)

    def forward(self, z: torch.Tensor) -> Quantized:
        b, c, h, w = z.shape
        if c != self.dim:
            raise ValueError(f"expected latents with {self.dim} channels (model.embed_dim), got shape {tuple(z.shape)}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        indices = self.nearest(flat.detach())
        onehot = F.one_hot(indices, self.n_embed).float()
        if self.training:
            self._learn(flat.detach(), onehot)
        z_q = self.codes(indices.view(b, h, w))
        commitment = F.mse_loss(z.float(), z_q.detach())
        loss = self.beta * commitment if self.ema_decay is not None else \
            self.beta * commitment + F.mse_loss(z_q, z.float().detach())
        z_q = (z + (z_q.to(z.dtype) - z).detach()) if self.training else z_q.to(z.dtype)
        counts = onehot.sum(0)
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return Quantized(z_q, loss, indices.view(b, h, w), perplexity.detach(), (counts > 0).float().mean())

    @torch.no_grad()
    def _learn(self, flat: torch.Tensor, onehot: torch.Tensor) -> None:
        """EMA updates of the codebook (when on) and dead-code restarts (when on), the same on every rank."""
        if not self.cluster_size.numel():
            weight = self.embedding.weight
            self.cluster_size = torch.ones(self.n_embed, device=weight.device)
            self.embed_sum = weight.detach().float().clone()
            self.idle_steps = torch.zeros(self.n_embed, dtype=torch.long, device=weight.device)
        counts, sums = onehot.sum(0), onehot.T @ flat
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if self.ema_decay is not None:
            d = self.ema_decay
            self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
            self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
            n = self.cluster_size.sum()
            size = (self.cluster_size + 1e-5) / (n + self.n_embed * 1e-5) * n  # Laplace smoothing
            self.embedding.weight.copy_(self.embed_sum / size[:, None])
        if self.restart_after is None:
            return
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.idle_steps >= self.restart_after).nonzero().flatten()
        if len(dead):
            picks = torch.randint(len(flat), (len(dead),), device=flat.device)
            fresh = flat[picks]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(fresh, 0)
            self.embedding.weight[dead] = fresh.to(self.embedding.weight.dtype)
            self.embed_sum[dead], self.cluster_size[dead], self.idle_steps[dead] = fresh, 1.0, 0
