"""The training loop both trainers run: stop signals and the deadline (agreed by every rank), the NaN guard,
logging, checkpoint and sample cadence, and resuming. A trainer supplies only what differs (`Trainer`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from time import monotonic
from typing import Any, Protocol

import torch
from PIL import Image
from tqdm import tqdm

from latent_diffusion.config import TrainConfig
from latent_diffusion.runtime import check_precision, resolve_device, reuse_freed_memory
from latent_diffusion.training.common import learning_rate, set_learning_rate
from latent_diffusion.training.distributed import DistributedContext, index_batches
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.run_log import RunLog, TimeEstimate, is_log_step
from latent_diffusion.training.state import load_training_state

log = logging.getLogger(__name__)

STATE_FILE = "checkpoints/last.safetensors"  # in the run folder: the newest training state, resumed from


class Trainer(Protocol):
    """What differs between trainers; `train_loop` does the rest."""

    label: str  # the progress bar's
    grid_name: str  # TensorBoard's tag for the grids `save` draws
    postfix: dict[str, str]  # figures of the log line shown on the progress bar, with their formats
    guard: NonFiniteGuard  # counts the skipped steps (see `finite_everywhere`)

    def batches(self, step: int) -> Iterable[Any]:
        """What each step from `step` on trains on (at least until max_steps)."""

    def train_step(self, batch: Any, step: int, lr: float) -> None:
        """One optimiser step at learning rate `lr` (collective under torchrun)."""

    def figures(self) -> dict[str, float] | None:
        """The figures of a log line, since the last one (None: nothing to log)."""

    def save(self, step: int, checkpoint: bool, samples: bool) -> Image.Image | None:
        """Write the checkpoint and/or the grid of samples (collective: every rank calls it; rank 0 writes);
        returns the grid drawn, if any."""


class LatentCacheSteps:
    """The stepping half of a diffusion `Trainer` over a latent cache (the LDM trainer, the adapter trainer):
    global batches of cache indices, the learning rate set, the mean loss of the steps since the last log line.
    The class provides `cfg.training`, `cache`, `optimizer`, `losses` and `step_loss(indices, step)` → the loss
    of one optimiser step (NaN for a skipped one)."""

    def batches(self, step: int) -> Iterator[torch.Tensor]:
        """The global batches of latent-cache indices from step `step` on."""
        return index_batches(len(self.cache), self.cfg.training.batch_size, self.cfg.training.seed, step)

    def train_step(self, indices: torch.Tensor, step: int, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)
        self.losses.append(self.step_loss(indices, step))

    def figures(self) -> dict[str, float]:
        """The mean loss of the steps since the last log line, skipped ones left out."""
        finite = [v for v in self.losses if math.isfinite(v)]
        self.losses = []
        return {"loss": sum(finite) / max(1, len(finite))}


def distributed_context(device: str, cfg: TrainConfig) -> DistributedContext:
    """This process's place in a (torchrun) run, on `device` ("auto", "cpu", "cuda", ...), checked for the
    configured precision; on a CPU, the C heap set to keep freed memory for reuse (`runtime.reuse_freed_memory`)."""
    ctx = DistributedContext.from_env(resolve_device(device))
    check_precision(cfg.precision, ctx.device)
    if ctx.device.type == "cpu":
        reuse_freed_memory()
    return ctx


def resume_optimizers(state: dict | None, optimizers: dict[str, torch.optim.Optimizer],
                      scaler: torch.amp.GradScaler) -> int:
    """The step a run starts at: 0 for a new run (`state` None), else the step of `state`, what
    `resume_training_state` restored the modules from, whose optimizer moments and loss scale are loaded here.
    The optimizers' hyperparameters stay those they were built with from the config."""
    if state is None:
        return 0
    configured = {name: [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                  for name, optimizer in optimizers.items()}
    load_training_state(state["path"], {}, optimizers, restore_rng=False)
    for name, optimizer in optimizers.items():
        for group, settings in zip(optimizer.param_groups, configured[name]):
            group.update(settings)
    scaler.load_state_dict(state["extra"].get("scaler", {}))
    log.info("resuming from %s (step %d)", state["path"], state["step"])
    return state["step"]


def finite_everywhere(ctx: DistributedContext, guard: NonFiniteGuard, loss: float, step: int,
                      optimizers: Iterable[torch.optim.Optimizer]) -> bool:
    """Whether the step's loss is finite on every rank, so the weights may be updated; if not, the step's
    gradients are dropped and `guard` counts it (too many in a row end the run)."""
    if guard.ok(not ctx.any(not math.isfinite(loss)), step, loss):
        return True
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return False


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   parameters: Iterable[torch.Tensor], grad_clip: float | None) -> None:
    """Update the weights from their (loss-scaled) gradients, clipped to norm `grad_clip` if given; then clear
    the gradients."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    optimizer.zero_grad(set_to_none=True)


class Deadline:
    """`minutes` from now (None: never)."""

    def __init__(self, minutes: float | None):
        self.at = monotonic() + 60 * minutes if minutes else math.inf

    def passed(self) -> bool:
        return monotonic() > self.at


def stop_reason(ctx: DistributedContext, signals: StopSignals, deadline: Deadline) -> str | None:
    """Why to stop before the next step, the same on every rank: a stop signal ("SIGTERM", "SIGINT"; "signal"
    on a rank it did not reach), the deadline ("max_minutes"), or None to go on."""
    signalled, late = ctx.any_each([signals.requested is not None, deadline.passed()])
    if signalled:
        return signals.requested or "signal"
    return "max_minutes" if late else None


def is_due(every: int, step: int, cfg: TrainConfig) -> bool:
    """Whether step `step` (counted from 1) is one of every `every`-th, or the last."""
    return step % every == 0 or step == cfg.max_steps


class _Throughput:
    """Images per second since the last reading."""

    def __init__(self) -> None:
        self.since, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        rate = self.images / (time.perf_counter() - self.since)
        self.since, self.images = time.perf_counter(), 0
        return round(rate, 2)


def train_loop(trainer: Trainer, cfg: TrainConfig, ctx: DistributedContext, root: Path, step: int,
               signals: StopSignals, progress: bool = True) -> dict:
    """Train from `step` to `cfg.max_steps`, logging to `root` every `log_every` steps, saving checkpoints and
    grids on their cadence; a stop signal or `max_minutes` saves both and ends the run early. Returns the last
    log line, with "stopped" when the run ended early."""
    last: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=trainer.label, disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    run_log, estimate = RunLog(root, step, ctx.is_main), TimeEstimate(step, cfg.max_steps, enabled=ctx.is_main)
    deadline, throughput = Deadline(cfg.max_minutes), _Throughput()
    try:
        for batch in trainer.batches(step):
            if step >= cfg.max_steps:
                break
            reason = stop_reason(ctx, signals, deadline)
            if reason is not None:
                log.info("stopping at step %d (%s)", step, "training.max_minutes reached"
                         if reason == "max_minutes" else reason)
                _save(trainer, run_log, step, checkpoint=True, samples=True)
                return {**last, "step": step, "stopped": reason}
            lr = learning_rate(cfg, step)
            trainer.train_step(batch, step, lr)
            step += 1
            throughput.add(cfg.batch_size)
            bar.update(1)
            estimate.step(step)
            figures = trainer.figures() if is_log_step(cfg, step) else None
            if figures is not None:
                last = {"step": step, "lr": lr, **figures, "images_per_s": throughput.read(),
                        "skipped_steps": trainer.guard.skipped}
                run_log.write(last)
                bar.set_postfix({key: f"{last[key]:{form}}" for key, form in trainer.postfix.items()})
            _save(trainer, run_log, step, is_due(cfg.checkpoint_every, step, cfg), is_due(cfg.image_every, step, cfg))
    finally:
        bar.close()
        run_log.close()
    return last


def _save(trainer: Trainer, run_log: RunLog, step: int, checkpoint: bool, samples: bool) -> None:
    if checkpoint or samples:
        grid = trainer.save(step, checkpoint, samples)
        if grid is not None:
            run_log.add_image(trainer.grid_name, grid, step)
