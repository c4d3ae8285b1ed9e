"""Training the first stage: `train_autoencoder(config, data, run_dir)`; resumable, logged, with image grids."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.autoencoder.losses import AutoencoderLoss, LossTerms
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, TrainConfig, load_config, save_config
from latent_diffusion.data import open_dataset
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.io.autoencoder import CONFIG_FILE, WEIGHTS_FILE
from latent_diffusion.io.checkpoint import load_training_state, save_training_state, save_weights
from latent_diffusion.runtime import autocast, check_precision, resolve_device
from latent_diffusion.training.common import append_jsonl, infinite_batches, learning_rate, set_learning_rate

log = logging.getLogger(__name__)

STATE_FILE = "checkpoints/last.safetensors"
LOG_FILE = "log.jsonl"


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

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

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


def train_autoencoder(cfg: AutoencoderRunConfig, data: str | os.PathLike, out: str | os.PathLike,
                      device: str = "auto", progress: bool = True) -> dict:
    """Train (or resume) an autoencoder on `data` in run folder `out`; returns the last logged losses."""
    paths = RunPaths(Path(out))
    dev = resolve_device(device)
    tcfg = cfg.training
    check_precision(tcfg.precision, dev)
    if paths.config.is_file():
        check_resumable(load_config(paths.config), cfg, paths.root)
    dataset = open_dataset(data, cfg.data.resolution, cfg.model.in_channels, "train",
                           cfg.data.random_crop, cfg.data.flip, tcfg.seed)
    if len(dataset) < tcfg.batch_size:
        raise ValueError(f"training.batch_size = {tcfg.batch_size} but {data} holds only {len(dataset)} images")

    torch.manual_seed(tcfg.seed)
    model = AutoencoderKL(cfg.model).to(dev)
    loss_fn = AutoencoderLoss(cfg.loss, cfg.model.out_channels).to(dev)
    opt_ae = torch.optim.Adam(model.parameters(), lr=tcfg.learning_rate, betas=tcfg.adam_betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.loss.disc_lr or tcfg.learning_rate,
                             betas=tcfg.adam_betas)
    scaler = torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16")
    modules = {"model": model, "discriminator": loss_fn.discriminator}
    optimizers = {"opt_ae": opt_ae, "opt_disc": opt_d}

    step = 0
    if paths.state.is_file():
        step = load_training_state(paths.state, modules, optimizers)["step"]
        log.info("resuming %s from step %d", paths.root, step)
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)

    fixed = torch.stack([dataset[i]["image"] for i in range(min(8, len(dataset)))]).to(dev)
    batches = infinite_batches(dataset, tcfg, step)
    last: dict = {}
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="autoencoder", disable=not progress, dynamic_ncols=True)
    timer, seen = time.perf_counter(), 0
    try:
        while step < tcfg.max_steps:
            x = next(batches)["image"].to(dev, non_blocking=True)
            lr = learning_rate(tcfg, step)
            set_learning_rate(opt_ae, lr)
            set_learning_rate(opt_d, cfg.loss.disc_lr or lr)
            terms, d_loss = _train_step(model, loss_fn, opt_ae, opt_d, scaler, x, step, dev, tcfg)
            step += 1
            seen += x.shape[0]
            bar.update(1)
            if step % tcfg.log_every == 0 or step == tcfg.max_steps:
                elapsed = time.perf_counter() - timer
                last = _log_line(step, lr, terms, d_loss, seen / elapsed)
                append_jsonl(paths.log, last)
                bar.set_postfix(l1=f"{last['l1']:.4f}", kl=f"{last['kl']:.0f}")
                timer, seen = time.perf_counter(), 0
            if step % tcfg.image_every == 0 or step == tcfg.max_steps:
                write_reconstruction_grid(model, fixed, paths.recon_grid(step), dev, tcfg.precision)
            if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
                _save(paths, cfg, model, modules, optimizers, step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: saving a checkpoint", step)
        _save(paths, cfg, model, modules, optimizers, step)
        raise
    finally:
        bar.close()
    return last


def _train_step(model: AutoencoderKL, loss_fn: AutoencoderLoss, opt_ae, opt_d, scaler, x: torch.Tensor, step: int,
                dev: torch.device, tcfg: TrainConfig) -> tuple[LossTerms, torch.Tensor | None]:
    model.train()
    loss_fn.train()
    with autocast(dev, tcfg.precision):
        x_rec, posterior = model(x)
    terms = loss_fn.generator_loss(x, x_rec, posterior, step, model.decoder.last_layer)
    if not torch.isfinite(terms.total):
        raise FloatingPointError(f"non-finite autoencoder loss at step {step}: {terms.total.item()} "
                                 "(learning rate too high, or fp16 overflow?)")
    opt_ae.zero_grad(set_to_none=True)
    scaler.scale(terms.total).backward()
    if tcfg.grad_clip:
        scaler.unscale_(opt_ae)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    scaler.step(opt_ae)
    d_loss = None
    if loss_fn.disc_active(step):
        with autocast(dev, tcfg.precision):
            d_loss = loss_fn.discriminator_loss(x, x_rec)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
    scaler.update()
    return terms, d_loss


@torch.no_grad()
def write_reconstruction_grid(model: AutoencoderKL, images: torch.Tensor, path: Path, dev: torch.device,
                              precision: str = "fp32") -> None:
    """Originals (top row) above their reconstructions (bottom row), enlarged for viewing."""
    model.eval()
    with autocast(dev, precision):
        recon = model(images, sample_posterior=False)[0]
    scale = max(1, 256 // images.shape[-1])
    save_image(make_grid([images, recon.float()], scale=scale), path)


def _log_line(step: int, lr: float, terms: LossTerms, d_loss, images_per_s: float) -> dict:
    line = {"step": step, "lr": lr, "loss": terms.total.item(), "rec": terms.rec.item(), "l1": terms.l1.item(),
            "kl": terms.kl.item(), "perceptual": terms.perceptual.item(), "g_loss": terms.g_loss.item(),
            "d_weight": terms.d_weight.item(), "images_per_s": round(images_per_s, 2)}
    if d_loss is not None:
        line["d_loss"] = d_loss.item()
    return line


def _save(paths: RunPaths, cfg: AutoencoderRunConfig, model: AutoencoderKL, modules, optimizers, step: int) -> None:
    save_training_state(paths.state, modules, optimizers, step)
    save_weights(model.state_dict(), paths.weights, metadata={"step": str(step), "format": "latent_diffusion.ae"})
    save_config(cfg, paths.config)
