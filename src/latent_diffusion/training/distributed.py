"""Data-parallel training on PyTorch's own engine: `torchrun` environment, DDP/FSDP wrapping, global batches.

The global batch (`training.batch_size`) is the same at every world size: each step draws one global batch of
indices and its randomness (timesteps, noise, condition dropout) identically on every rank, each rank takes its
contiguous slice, and splits it into micro-batches of `training.micro_batch_size` (gradient accumulation).
So a 2-process run follows the same trajectory as a 1-process run with the same seed, to rounding.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from latent_diffusion.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: rank, world size and its device (from torchrun's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> DistributedContext:
        """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a plain run is world size 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d of %d on %s", rank, world, device)
        return cls(rank, world, local, device)

    def close(self) -> None:
        """Leave the process group (else gloo's threads can abort the interpreter at exit)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (so all ranks take the same branch)."""
        return self.any_each([flag])[0]

    def any_each(self, flags: Sequence[bool]) -> list[bool]:
        """`any` of each flag, in one all-reduce."""
        if not self.enabled:
            return list(flags)
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(value) for value in values.tolist()]

    def average_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over ranks, in one all-reduce (for small trained sets,
        such as adapters, that are not wrapped in DDP)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not self.enabled or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(mean.view_as(grad))

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks (for logging)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size


def micro_batches(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-rank batch, accumulation steps) that keep the global `batch_size` at this world size."""
    per_rank, rest = divmod(cfg.batch_size, world_size)
    if rest:
        raise ConfigError(f"training.batch_size = {cfg.batch_size}: expected a multiple of the world size "
                          f"{world_size}, so the global batch stays the same")
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"training.micro_batch_size = {micro}: expected a divisor of the per-rank batch "
                          f"{per_rank} (batch_size {cfg.batch_size} / world size {world_size})")
    return per_rank, per_rank // micro


def rank_chunks(n: int, ctx: DistributedContext, accumulation: int) -> list[slice]:
    """The micro-batch slices of a global batch of `n` that this rank computes."""
    per_rank = n // ctx.world_size
    micro = per_rank // accumulation
    start = ctx.rank * per_rank
    return [slice(start + i * micro, start + (i + 1) * micro) for i in range(accumulation)]


SHARDED_BLOCKS = ("ResBlock", "SpatialTransformer")


def wrap(model: nn.Module, ctx: DistributedContext, strategy: str = "ddp") -> nn.Module:
    """The model as trained: itself (one process), DistributedDataParallel, or FSDP: every ResBlock and spatial
    transformer, then the rest, sharded over the ranks in place (`torch.distributed.fsdp.fully_shard`)."""
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in [m for m in model.modules() if type(m).__name__ in SHARDED_BLOCKS]:
            fully_shard(block)
        return fully_shard(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not last and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def gather(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of a state dict whose entries may be FSDP shards (DTensors). Collective under FSDP: every
    rank must call it."""
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in tensors.items()}


def gather_optimizer(state: dict) -> dict:
    """`optimizer.state_dict()` with FSDP-sharded moments gathered (collective under FSDP)."""
    return {"state": {i: gather(values) for i, values in state["state"].items()},
            "param_groups": state["param_groups"]}


def index_batches(num_items: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Global index batches forever; epoch e is a permutation seeded by seed + e, so a resumed run continues
    with the batch it would have drawn next, at any world size."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"training.batch_size = {batch_size} but the dataset holds only {num_items} items")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        for b in range(skip, per_epoch):
            yield order[b * batch_size:(b + 1) * batch_size]
        epoch, skip = epoch + 1, 0


class RankBatches(torch.utils.data.Sampler):
    """The micro-batches (index lists) this rank loads, `accumulation` per step, from step `start_step` on:
    a batch sampler for a DataLoader, so workers load them in the background."""

    def __init__(self, num_items: int, cfg: TrainConfig, ctx: DistributedContext, accumulation: int,
                 start_step: int = 0):
        self.num_items, self.cfg, self.ctx = num_items, cfg, ctx
        self.accumulation, self.start_step = accumulation, start_step

    def __len__(self) -> int:
        return max(0, self.cfg.max_steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        batches = index_batches(self.num_items, self.cfg.batch_size, self.cfg.seed, self.start_step)
        for _, indices in zip(range(self.start_step, self.cfg.max_steps), batches):
            for part in rank_chunks(len(indices), self.ctx, self.accumulation):
                yield indices[part].tolist()
