"""Training the first stage: `train_autoencoder(config, data, run_dir)`; resumable, logged, with image grids."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.autoencoder.losses import AutoencoderLoss, LossTerms
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, load_config, save_config
from latent_diffusion.data import open_dataset
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.formats.autoencoder import CONFIG_FILE, WEIGHTS_FILE
from latent_diffusion.files.weights import save_weights
from latent_diffusion.training.state import resume_training_state, save_training_state
from latent_diffusion.runtime import autocast, check_precision, resolve_device
from latent_diffusion.training.common import check_batch_fits, learning_rate, run_in_folder, set_learning_rate
from latent_diffusion.training.distributed import DistributedContext, RankBatches, micro_batches, no_sync, wrap
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.run_log import RunLog, TimeEstimate, is_log_step, log_summary, parameter_counts

log = logging.getLogger(__name__)

STATE_FILE = "checkpoints/last.safetensors"


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
    """Everything a training step needs."""

    cfg: AutoencoderRunConfig
    ctx: DistributedContext
    model: AutoencoderKL
    trained: nn.Module
    loss_fn: AutoencoderLoss
    disc_objective: nn.Module
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: NonFiniteGuard

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "discriminator": self.loss_fn.discriminator}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_ae": self.opt_ae, "opt_disc": self.opt_d}


def train_autoencoder(cfg: AutoencoderRunConfig, data: str | os.PathLike, out: str | os.PathLike,
                      device: str = "auto", progress: bool = True) -> dict:
    """Train (or resume) an autoencoder on `data` in run folder `out`; returns the last logged losses.

    Runs unchanged under `torchrun`; SIGTERM/SIGINT save a checkpoint and return; a NaN/inf loss skips its step.
    (Under DDP the adaptive GAN weight is computed from each process's own micro-batch.)
    """
    paths = RunPaths(Path(out))
    ctx = DistributedContext.from_env(resolve_device(device))
    check_precision(cfg.training.precision, ctx.device)
    if cfg.training.strategy != "ddp":
        raise ConfigError(f"training.strategy = '{cfg.training.strategy}': the autoencoder trains with 'ddp' "
                          "(sharding is for diffusion UNets too large to replicate)")
    return run_in_folder(paths.root, ctx.is_main, lambda signals: _train(cfg, data, paths, ctx, signals, progress))


def _train(cfg: AutoencoderRunConfig, data, paths: RunPaths, ctx: DistributedContext, signals: StopSignals,
           progress: bool) -> dict:
    tcfg = cfg.training
    _, accumulation = micro_batches(tcfg, ctx.world_size)
    if paths.config.is_file():
        check_resumable(load_config(paths.config), cfg, paths.root)
    dataset = open_dataset(data, cfg.data.resolution, cfg.model.in_channels, "train",
                           cfg.data.random_crop, cfg.data.flip, tcfg.seed, captions=False)
    check_batch_fits(tcfg, data, len(dataset))
    run = _build_run(cfg, ctx)
    step = 0
    state = resume_training_state(paths.state, run.modules, run.optimizers)
    if state is not None:
        step = state["step"]
        run.scaler.load_state_dict(state["extra"].get("scaler", {}))
        log.info("resuming %s from step %d", paths.root, step)
    fixed = torch.stack([dataset[i]["image"] for i in range(min(8, len(dataset)))]).to(ctx.device)  # readable?
    if ctx.is_main:
        save_config(cfg, paths.config)
        log_summary(len(dataset), tcfg.batch_size, tcfg.max_steps,
                    *parameter_counts([run.model, run.loss_fn.discriminator], [run.loss_fn]))
    signals.check(step)
    loader = DataLoader(dataset, batch_sampler=RankBatches(len(dataset), tcfg, ctx, accumulation, step),
                        num_workers=tcfg.num_workers,
                        generator=torch.Generator().manual_seed(tcfg.seed + step))  # not the global RNG
    return _train_loop(run, paths, loader, accumulation, fixed, step, signals, progress)


def _build_run(cfg: AutoencoderRunConfig, ctx: DistributedContext) -> _Run:
    dev, tcfg = ctx.device, cfg.training
    if cfg.model.pixel_space:
        raise ConfigError("model.pixel_space = true: pixel space is the identity and has nothing to train; use "
                          "`autoencoder: pixel` in the LDM config instead")
    torch.manual_seed(tcfg.seed)
    model = AutoencoderKL(cfg.model).to(dev)
    loss_fn = AutoencoderLoss(cfg.loss, cfg.model.out_channels).to(dev)
    opt_ae = torch.optim.Adam(model.parameters(), lr=tcfg.learning_rate, betas=tcfg.adam_betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.loss.disc_lr or tcfg.learning_rate,
                             betas=tcfg.adam_betas)
    return _Run(cfg, ctx, model, wrap(model, ctx), loss_fn, wrap(_DiscriminatorObjective(loss_fn), ctx), opt_ae,
                opt_d, torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16"),
                NonFiniteGuard(tcfg.max_bad_steps, "autoencoder"))


def _train_loop(run: _Run, paths: RunPaths, loader: DataLoader, accumulation: int, fixed: torch.Tensor, step: int,
                signals: StopSignals, progress: bool) -> dict:
    cfg, tcfg, ctx = run.cfg, run.cfg.training, run.ctx
    last: dict = {}
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="autoencoder", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    timer, seen = time.perf_counter(), 0
    micro: list[torch.Tensor] = []
    run_log, estimate = RunLog(paths.root, step, ctx.is_main), TimeEstimate(step, tcfg.max_steps, enabled=ctx.is_main)
    try:
        for batch in loader:
            micro.append(batch["image"].to(ctx.device, non_blocking=True))
            if len(micro) < accumulation:
                continue
            if ctx.any(signals.requested is not None):
                _save(run, paths, step)
                last = {**last, "step": step, "stopped": signals.requested or "signal"}
                break
            lr = learning_rate(tcfg, step)
            set_learning_rate(run.opt_ae, lr)
            set_learning_rate(run.opt_d, cfg.loss.disc_lr or lr)
            terms, d_loss = _train_step(run, micro, step)
            step += 1
            seen += sum(len(x) for x in micro) * ctx.world_size
            micro = []
            bar.update(1)
            estimate.step(step)
            if is_log_step(tcfg, step) and terms is not None:
                last = _log_line(step, lr, terms, d_loss, seen / (time.perf_counter() - timer))
                last["skipped_steps"] = run.guard.skipped
                run_log.write(last)
                bar.set_postfix(l1=f"{last['l1']:.4f}", kl=f"{last['kl']:.0f}")
                timer, seen = time.perf_counter(), 0
            if (step % tcfg.image_every == 0 or step == tcfg.max_steps) and ctx.is_main:
                grid = write_reconstruction_grid(run.model, fixed, paths.recon_grid(step), ctx.device, tcfg.precision)
                run_log.add_image("reconstructions", grid, step)
            if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
                _save(run, paths, step)
    finally:
        bar.close()
        run_log.close()
    return last


def _train_step(run: _Run, micro: list[torch.Tensor], step: int) -> tuple[LossTerms | None, torch.Tensor | None]:
    """Generator update over the micro-batches, then (once active) the discriminator's; None terms if skipped."""
    run.model.train()
    run.loss_fn.train()
    dev, tcfg, n = run.ctx.device, run.cfg.training, len(micro)
    terms, reconstructions = None, []
    for i, x in enumerate(micro):
        with no_sync(run.trained, last=i == n - 1), autocast(dev, tcfg.precision):
            x_rec, posterior = run.trained(x)
            terms = run.loss_fn.generator_loss(x, x_rec, posterior, step, run.model.decoder.last_layer)
            run.scaler.scale(terms.total / n).backward()
        reconstructions.append(x_rec.detach())
    bad = run.ctx.any(not torch.isfinite(terms.total).item())
    if not run.guard.ok(not bad, step, terms.total.item()):
        run.opt_ae.zero_grad(set_to_none=True)
        return None, None
    if tcfg.grad_clip:
        run.scaler.unscale_(run.opt_ae)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.grad_clip)
    run.scaler.step(run.opt_ae)
    run.opt_ae.zero_grad(set_to_none=True)
    d_loss = None
    if run.loss_fn.disc_active(step):
        run.opt_d.zero_grad(set_to_none=True)
        for i, (x, x_rec) in enumerate(zip(micro, reconstructions)):
            with no_sync(run.disc_objective, last=i == n - 1), autocast(dev, tcfg.precision):
                d_loss = run.disc_objective(x, x_rec)
                run.scaler.scale(d_loss / n).backward()
        run.scaler.step(run.opt_d)
    run.scaler.update()
    return terms, d_loss


@torch.no_grad()
def write_reconstruction_grid(model: AutoencoderKL, images: torch.Tensor, path: Path, dev: torch.device,
                              precision: str = "fp32", size: int = 256) -> Image.Image:
    """Originals (top row) above their reconstructions (bottom row), enlarged to about `size` pixels high each;
    written to `path` and returned."""
    model.eval()
    with autocast(dev, precision):
        recon = model(images, sample_posterior=False)[0]
    scale = max(1, size // images.shape[-1])
    grid = make_grid([images, recon.float()], scale=scale, captions=["originals", "reconstructions"])
    save_image(grid, path)
    return grid


def _log_line(step: int, lr: float, terms: LossTerms, d_loss, images_per_s: float) -> dict:
    line = {"step": step, "lr": lr, "loss": terms.total.item(), "rec": terms.rec.item(), "l1": terms.l1.item(),
            "kl": terms.kl.item(), "perceptual": terms.perceptual.item(), "g_loss": terms.g_loss.item(),
            "d_weight": terms.d_weight.item(), "images_per_s": round(images_per_s, 2)}
    if d_loss is not None:
        line["d_loss"] = d_loss.item()
    return line


def _save(run: _Run, paths: RunPaths, step: int) -> None:
    """Rank 0 writes the training state, the weights and the config; every rank waits for it."""
    if run.ctx.is_main:
        save_training_state(paths.state, run.modules, run.optimizers, step, extra={"scaler": run.scaler.state_dict()})
        save_weights(run.model.state_dict(), paths.weights, metadata={"step": str(step),
                                                                      "format": "latent_diffusion.ae"})
        save_config(run.cfg, paths.config)
    run.ctx.barrier()
