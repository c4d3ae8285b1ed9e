"""Training the first stage: `train_autoencoder(config, data, run_dir)`; resumable, logged, with image grids."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latent_diffusion.autoencoder import AutoencoderKL, build_autoencoder
from latent_diffusion.autoencoder.quantize import Quantized
from latent_diffusion.autoencoder.losses import AutoencoderLoss, LossTerms
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, load_config, save_config
from latent_diffusion.data import open_dataset
from latent_diffusion.files.weights import CheckpointError, load_module_weights, load_weights, save_weights
from latent_diffusion.formats.autoencoder import CONFIG_FILE, WEIGHTS_FILE
from latent_diffusion.runtime import autocast
from latent_diffusion.training.common import check_batch_fits, run_in_folder, set_learning_rate
from latent_diffusion.training.distributed import DistributedContext, RankBatches, micro_batches, no_sync, wrap
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.grids import write_reconstruction_grid
from latent_diffusion.training.loop import (STATE_FILE, distributed_context, finite_everywhere, optimizer_step,
                                            resume_optimizers, train_loop)
from latent_diffusion.training.run_log import log_summary, parameter_counts
from latent_diffusion.training.state import resume_training_state, save_training_state

log = logging.getLogger(__name__)


@dataclass
class RunPaths:
    """Files of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    def recon_grid(self, step: int) -> Path:
        return self.root / "samples" / f"recon_{step:07d}.png"


def check_trainable(cfg: AutoencoderRunConfig) -> None:
    """Refuse, before any work, a configuration this trainer would not follow."""
    if cfg.training.strategy != "ddp":
        raise ConfigError(f"training.strategy = '{cfg.training.strategy}': the autoencoder trains with 'ddp' "
                          "(sharding is for diffusion UNets too large to replicate)")
    if cfg.model.pixel_space:
        raise ConfigError("model.pixel_space = true: pixel space is the identity and has nothing to train; use "
                          "`autoencoder: pixel` in the LDM config instead")


def check_resumable(stored: AutoencoderRunConfig, given: AutoencoderRunConfig, run_dir: Path) -> None:
    """A run may be resumed with new training settings, but not with another model or loss."""
    for section in ("model", "loss"):
        a, b = getattr(stored, section), getattr(given, section)
        if section == "model":
            a, b = replace(a, latent_scale=None), replace(b, latent_scale=None)
        if a != b:
            raise ConfigError(f"{run_dir} was started with a different '{section}' section; "
                              f"use a new --out folder or the stored {run_dir / CONFIG_FILE}")


class _DiscriminatorObjective(nn.Module):
    """The discriminator's loss as a module, so DDP can reduce the discriminator's gradients."""

    def __init__(self, loss_fn: AutoencoderLoss):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        return self.loss_fn.discriminator_loss(x, x_rec)


@dataclass
class _Run:
    """The autoencoder's `Trainer` (see `training.loop`): its modules, optimizers, data and what it last logged."""

    cfg: AutoencoderRunConfig
    ctx: DistributedContext
    paths: RunPaths
    model: AutoencoderKL
    trained: nn.Module
    loss_fn: AutoencoderLoss
    disc_objective: nn.Module
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    guard: NonFiniteGuard
    dataset: Dataset
    accumulation: int  # micro-batches a step
    fixed: torch.Tensor  # the originals of the reconstruction grids
    terms: LossTerms | None = None  # of the last step, None if it was skipped
    d_loss: torch.Tensor | None = None
    codes: Quantized | None = None  # a VQ model's last quantisation (perplexity, usage)

    label = "autoencoder"
    grid_name = "reconstructions"

    @property
    def postfix(self) -> dict[str, str]:
        return {"l1": ".4f", **({"perplexity": ".1f"} if self.cfg.model.regularizer == "vq" else {"kl": ".0f"})}

    @property
    def modules(self) -> dict[str, nn.Module]:
        ema = {"ema": self.ema} if self.ema is not None else {}
        return {"model": self.model, "discriminator": self.loss_fn.discriminator, **ema}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_ae": self.opt_ae, "opt_disc": self.opt_d}

    def batches(self, step: int) -> Iterator[list[torch.Tensor]]:
        """This rank's micro-batches of each step from `step` on."""
        tcfg = self.cfg.training
        sampler = RankBatches(len(self.dataset), tcfg, self.ctx, self.accumulation, step)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=tcfg.num_workers,
                            generator=torch.Generator().manual_seed(tcfg.seed + step))  # not the global RNG
        micro: list[torch.Tensor] = []
        for batch in loader:
            micro.append(batch["image"].to(self.ctx.device, non_blocking=True))
            if len(micro) == self.accumulation:
                yield micro
                micro = []

    def train_step(self, micro: list[torch.Tensor], step: int, lr: float) -> None:
        """The generator's update over the micro-batches, then (once active) the discriminator's."""
        set_learning_rate(self.opt_ae, lr)
        set_learning_rate(self.opt_d, self.cfg.loss.disc_lr or lr)
        self.model.train()
        self.loss_fn.train()
        n, total, reconstructions = len(micro), 0.0, []
        for i, x in enumerate(micro):
            with no_sync(self.trained, last=i == n - 1), autocast(self.ctx.device, self.cfg.training.precision):
                x_rec, regularizer = self.trained(x)
                terms = self.loss_fn.generator_loss(x, x_rec, regularizer, step, self.model.decoder.last_layer)
                self.scaler.scale(terms.total / n).backward()
            reconstructions.append(x_rec.detach())
            total += terms.total.item() / n
        self.terms = self.d_loss = None
        if not finite_everywhere(self.ctx, self.guard, total, step, [self.opt_ae]):
            return
        optimizer_step(self.opt_ae, self.scaler, self.model.parameters(), self.cfg.training.grad_clip)
        if self.ema is not None:
            self.ema.update(self.model)
        self.terms = terms
        self.codes = regularizer if isinstance(regularizer, Quantized) else None
        if self.loss_fn.disc_active(step):
            self.d_loss = self._discriminator_step(micro, reconstructions)
        self.scaler.update()

    def _discriminator_step(self, micro: list[torch.Tensor], reconstructions: list[torch.Tensor]) -> torch.Tensor:
        self.opt_d.zero_grad(set_to_none=True)
        for i, (x, x_rec) in enumerate(zip(micro, reconstructions)):
            with no_sync(self.disc_objective, last=i == len(micro) - 1), \
                    autocast(self.ctx.device, self.cfg.training.precision):
                d_loss = self.disc_objective(x, x_rec)
                self.scaler.scale(d_loss / len(micro)).backward()
        self.scaler.step(self.opt_d)
        return d_loss

    def figures(self) -> dict[str, float] | None:
        """The last step's loss terms (None if it was skipped)."""
        if self.terms is None:
            return None
        t = self.terms
        d_loss = {"d_loss": self.d_loss.item()} if self.d_loss is not None else {}
        regularizer = {"kl": t.kl.item()} if self.codes is None else {
            "vq": t.kl.item(), "perplexity": self.codes.perplexity.item(), "codes_used": self.codes.usage.item()}
        return {"loss": t.total.item(), "rec": t.rec.item(), "l1": t.l1.item(), **regularizer,
                "perceptual": t.perceptual.item(), "g_loss": t.g_loss.item(), "d_weight": t.d_weight.item(), **d_loss}

    def save(self, step: int, checkpoint: bool, samples: bool) -> Image.Image | None:
        """The reconstruction grid (rank 0), then the training state, the weights (the EMA average when kept)
        and the config (rank 0; every rank waits for it)."""
        grid = None
        if samples and self.ctx.is_main:
            grid = write_reconstruction_grid(self._weighted(), self.fixed, self.paths.recon_grid(step),
                                             self.ctx.device, self.cfg.training.precision)
        if checkpoint:
            if self.ctx.is_main:
                save_training_state(self.paths.state, self.modules, self.optimizers, step,
                                    extra={"scaler": self.scaler.state_dict()})
                save_weights(self._weights(), self.paths.weights,
                             metadata={"step": str(step), "format": "latent_diffusion.ae"})
                save_config(self.cfg, self.paths.config)
            self.ctx.barrier()
        return grid

    def _weights(self) -> dict[str, torch.Tensor]:
        """The weights a model is made of: the EMA average when training keeps one."""
        return {**self.model.state_dict(), **(self.ema.averaged() if self.ema is not None else {})}

    def _weighted(self) -> AutoencoderKL:
        """The model holding `_weights()` (a copy when they are the EMA's)."""
        if self.ema is None:
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(self._weights())
        return model


def train_autoencoder(cfg: AutoencoderRunConfig, data: str | os.PathLike, out: str | os.PathLike,
                      device: str = "auto", progress: bool = True) -> dict:
    """Train (or resume) an autoencoder on `data` in run folder `out`; returns the last logged losses.

    Runs unchanged under `torchrun`; SIGTERM/SIGINT (or `training.max_minutes`) save a checkpoint and return; a
    NaN/inf loss skips its step. (Under DDP the adaptive GAN weight is computed from each process's own micro-batch.)
    """
    paths = RunPaths(Path(out))
    with distributed_context(device, cfg.training) as ctx:
        check_trainable(cfg)
        return run_in_folder(paths.root, ctx.is_main,
                             lambda signals: _train(cfg, data, paths, ctx, signals, progress))


def _train(cfg: AutoencoderRunConfig, data, paths: RunPaths, ctx: DistributedContext, signals: StopSignals,
           progress: bool) -> dict:
    tcfg = cfg.training
    if paths.config.is_file():
        check_resumable(load_config(paths.config), cfg, paths.root)
    dataset = open_dataset(data, cfg.data.resolution, cfg.model.in_channels, "train",
                           cfg.data.random_crop, cfg.data.flip, tcfg.seed, captions=False)
    check_batch_fits(tcfg, data, len(dataset))
    run = _build_run(cfg, ctx, paths, dataset)
    state = resume_training_state(paths.state, run.modules, {})
    step = resume_optimizers(state, run.optimizers, run.scaler)
    if ctx.is_main:
        save_config(cfg, paths.config)
        log_summary(len(dataset), tcfg.batch_size, tcfg.max_steps,
                    *parameter_counts([run.model, run.loss_fn.discriminator], [run.loss_fn]))
    signals.check(step)
    return train_loop(run, tcfg, ctx, paths.root, step, signals, progress)


def _build_run(cfg: AutoencoderRunConfig, ctx: DistributedContext, paths: RunPaths, dataset: Dataset) -> _Run:
    dev, tcfg = ctx.device, cfg.training
    _, accumulation = micro_batches(tcfg, ctx.world_size)
    torch.manual_seed(tcfg.seed)
    model = build_autoencoder(cfg.model).to(dev)
    loss_fn = AutoencoderLoss(cfg.loss, cfg.model.out_channels).to(dev)
    if tcfg.init_from:
        init_weights(tcfg.init_from, model)
    opt_ae = torch.optim.AdamW(model.parameters(), lr=tcfg.learning_rate, betas=tcfg.adam_betas,
                               weight_decay=tcfg.weight_decay)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.loss.disc_lr or tcfg.learning_rate,
                             betas=tcfg.adam_betas)
    ema = EMA(model, tcfg.ema_decay).to(dev) if tcfg.ema_decay else None
    fixed = torch.stack([dataset[i]["image"] for i in range(min(8, len(dataset)))]).to(dev)
    return _Run(cfg, ctx, paths, model, wrap(model, ctx), loss_fn, wrap(_DiscriminatorObjective(loss_fn), ctx),
                opt_ae, opt_d, torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16"), ema,
                NonFiniteGuard(tcfg.max_bad_steps, "autoencoder"), dataset, accumulation, fixed)


def init_weights(path: str, model: AutoencoderKL) -> None:
    """Start from the weights of the autoencoder run (or model `autoencoder/` folder) at `path`."""
    weights = Path(path) / WEIGHTS_FILE
    try:
        load_module_weights(model, load_weights(weights), str(weights))
    except (OSError, CheckpointError) as exc:
        raise ConfigError(f"training.init_from = {path!r}: expected an autoencoder run folder (with {WEIGHTS_FILE}) "
                          f"of the same model; {exc}") from exc
    log.info("initialised from %s", path)
