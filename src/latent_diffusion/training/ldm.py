"""Training the latent diffusion model: `train_ldm(config, data, run_dir)`; resumable, logged, with sample grids."""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.spatial import spatial_kind, with_spatial
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, LDMRunConfig, save_config
from latent_diffusion.data import count_captioned, open_dataset
from latent_diffusion.conditioning.dropout import drop_mask
from latent_diffusion.diffusion.guidance import network_kwargs
from latent_diffusion.diffusion.flow import flow_loss, logit_normal
from latent_diffusion.diffusion.objective import diffusion_loss
from latent_diffusion.formats.autoencoder import load_autoencoder
from latent_diffusion.files.weights import CheckpointError, load_module_weights, save_weights
from latent_diffusion.training.state import resume_training_state, save_training_state
from latent_diffusion.formats.model import load_model
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.registry import build_conditioner, conditioner_type
from latent_diffusion.diffusion.schedule import build_schedule
from latent_diffusion.formats.model import AUTOENCODER_DIR, CONDITIONER_FILE, CONFIG_FILE, UNET_FILE
from latent_diffusion.generation.model import LatentDiffusion
from latent_diffusion.runtime import autocast
from latent_diffusion.training.common import check_batch_fits, run_in_folder
from latent_diffusion.training.distributed import (DistributedContext, gather, gather_optimizer,
                                                   micro_batches, no_sync, rank_chunks, wrap)
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.first_stage import prepare_run_folder, stage_one_config
from latent_diffusion.training.grids import sample_inputs, write_sample_grid
from latent_diffusion.training.latent_cache import LatentCache, encode_dataset
from latent_diffusion.training.loop import (STATE_FILE, LatentCacheSteps, distributed_context, finite_everywhere,
                                            optimizer_step, resume_optimizers, train_loop)
from latent_diffusion.training.run_log import log_summary, parameter_counts
from latent_diffusion.backbones import build_backbone

log = logging.getLogger(__name__)


class TrainedNetwork(nn.Module):
    """What the optimiser trains, as one module (so DDP reduces every gradient): the UNet, and the trained part
    of the conditioner (`Conditioner.trainable`: a class embedder, a text adapter), which turns the batch's
    `Conditioner.training_inputs` (labels, frozen text tokens; already dropped for CFG) into its condition."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module | None = None):
        super().__init__()
        self.unet, self.conditioner = unet, conditioner

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs) -> torch.Tensor:
        cond = inputs if self.conditioner is None else self.conditioner(inputs)
        return self.unet(x, t, **network_kwargs(cond))


@dataclass
class _Run(LatentCacheSteps):
    """The diffusion model's `Trainer` (see `training.loop`): everything a training step needs."""

    cfg: LDMRunConfig
    ctx: DistributedContext
    out: Path
    unet: nn.Module
    ema: EMA | None
    conditioner_ema: EMA | None  # of the trained conditioner (class embedder or adapter), when there is one
    conditioner: Conditioner
    autoencoder: AutoencoderKL
    cache: LatentCache
    scaler: torch.amp.GradScaler
    rng: torch.Generator
    accumulation: int
    guard: NonFiniteGuard
    model: nn.Module | None = None  # the UNet (+ class embedder) as trained: DDP- or FSDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer | None = None
    losses: list[float] = field(default_factory=list)  # of the steps since the last log line (NaN: skipped)
    alphas_cumprod: torch.Tensor = field(init=False)

    label = "ldm"
    grid_name = "samples"
    postfix = {"loss": ".4f"}

    def __post_init__(self) -> None:
        self.alphas_cumprod = build_schedule(self.cfg.diffusion).alphas_cumprod.to(self.ctx.device)

    def step_loss(self, indices: torch.Tensor, step: int) -> float:
        return _train_step(self, indices, step)

    def save(self, step: int, checkpoint: bool, samples: bool) -> Image.Image | None:
        """The training state and the sampling weights, and the grid drawn with them (rank 0 writes; every rank
        waits for it); the weights are gathered once for both."""
        samples = samples and bool(self.cfg.sampling.prompts)
        if not (checkpoint or samples):
            return None
        states = _gathered_states(self)
        weights = _sampling_weights(self, states)
        if checkpoint:
            _checkpoint(self, step, states, weights)
        grid = _write_samples(self, step, weights) if samples else None
        self.ctx.barrier()
        return grid


def train_ldm(cfg: LDMRunConfig, data: str | os.PathLike, out: str | os.PathLike, device: str = "auto",
              progress: bool = True) -> dict:
    """Train (or resume) the UNet of a latent diffusion model in run folder `out`; returns the last log line.

    Runs unchanged under `torchrun` (one process per device). SIGTERM/SIGINT or `training.max_minutes` save a
    checkpoint and return (the line then has "stopped"); a NaN/inf loss skips its step.
    """
    out = Path(out)
    with distributed_context(device, cfg.training) as ctx:
        check_trainable(cfg)
        return run_in_folder(out, ctx.is_main, lambda signals: _train(cfg, data, out, ctx, signals, progress))


def _train(cfg: LDMRunConfig, data, out: Path, ctx: DistributedContext, signals: StopSignals,
           progress: bool) -> dict:
    tcfg = cfg.training
    _, accumulation = micro_batches(tcfg, ctx.world_size)
    ae_cfg = stage_one_config(cfg, out)
    dataset = open_dataset(data, cfg.data.resolution, ae_cfg.model.in_channels, "train", seed=tcfg.seed)
    captioned = check_data(cfg, data, dataset)
    if ctx.is_main:
        prepare_run_folder(cfg, out, ae_cfg)
    ctx.barrier()
    run = _build_run(cfg, dataset, captioned, out, ctx, accumulation, progress, signals)
    if ctx.is_main:
        save_config(cfg, out / CONFIG_FILE)
    state = resume_training_state(out / STATE_FILE, _modules(run), {}, {"batches": run.rng})  # whole weights
    run.model = wrap(TrainedNetwork(run.unet, run.conditioner.trainable), ctx, tcfg.strategy)  # then shard
    if run.ema is not None:
        run.ema.shard_like(run.unet)
    if run.conditioner_ema is not None:
        run.conditioner_ema.shard_like(run.conditioner.trainable)
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=tcfg.learning_rate, betas=tcfg.adam_betas,
                                      weight_decay=tcfg.weight_decay, fused=tcfg.strategy != "fsdp" or None)
    step = resume_optimizers(state, {"optimizer": run.optimizer}, run.scaler)
    signals.check(step)
    return train_loop(run, tcfg, ctx, out, step, signals, progress)


def check_trainable(cfg: LDMRunConfig) -> None:
    """Refuse, before any work, a configuration that would train against an untrained condition encoder."""
    conditioner_type(cfg.conditioning.encoder).check_trainable(cfg.conditioning)


def _build_run(cfg: LDMRunConfig, dataset: Dataset, captioned: int | None, out: Path, ctx: DistributedContext,
               accumulation: int, progress: bool, signals: StopSignals) -> _Run:
    dev, tcfg = ctx.device, cfg.training
    autoencoder, _ = load_autoencoder(out / AUTOENCODER_DIR, dev)
    conditioner = build_conditioner(cfg.conditioning, dev, cfg.network.context_dim)
    if cfg.conditioning.cache:
        conditioner.cache_frozen(out / "cache" / "text")
    if getattr(conditioner, "vector_dim", None) != cfg.network.adm_in_channels:
        raise ConfigError(f"{cfg.backbone}.adm_in_channels = {cfg.network.adm_in_channels}: the "
                          f"{cfg.conditioning.encoder} encoder gives a vector condition of "
                          f"{getattr(conditioner, 'vector_dim', None)}")
    if cfg.network.context_dim is not None and conditioner.dim != cfg.network.context_dim:
        raise ConfigError(f"{cfg.backbone}.context_dim = {cfg.network.context_dim}: the {cfg.conditioning.encoder} "
                          f"encoder gives {conditioner.dim}-wide tokens")
    if cfg.data.flip or cfg.data.random_crop:
        log.warning("data.flip / data.random_crop are not applied: the latent cache holds each image once, "
                    "centre-cropped and unflipped")
    torch.manual_seed(tcfg.seed)
    unet = build_backbone(cfg.network).to(dev)
    if tcfg.init_from:
        init_weights(tcfg.init_from, unet, conditioner.trainable)
    trainable = conditioner.trainable
    ema = EMA(unet, tcfg.ema_decay).to(dev) if tcfg.ema_decay else None
    conditioner_ema = EMA(trainable, tcfg.ema_decay).to(dev) if tcfg.ema_decay and trainable is not None else None
    if ctx.is_main:  # before the latent cache, which can take a while
        log_summary(len(dataset), tcfg.batch_size, tcfg.max_steps,
                    *parameter_counts([unet, trainable], [autoencoder, conditioner.encoder]), captioned)
    signals.check()
    cache = encode_dataset(autoencoder, dataset, out / "cache", batch_size=64, progress=progress and ctx.is_main,
                           keep_images=cfg.conditioning.spatial != "none", ctx=ctx, signals=signals,
                           num_workers=tcfg.num_workers)
    scaler = torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16")
    return _Run(cfg, ctx, out, unet, ema, conditioner_ema, conditioner, autoencoder, cache, scaler,
                torch.Generator().manual_seed(tcfg.seed), accumulation, NonFiniteGuard(tcfg.max_bad_steps, "diffusion"))


def check_data(cfg: LDMRunConfig, data, dataset: Dataset) -> int | None:
    """The number of captioned images (None for a class-conditional model); refuses too few images for a batch,
    and a text-conditional model on data without a single caption (warns about uncaptioned images)."""
    images = len(dataset)
    check_batch_fits(cfg.training, data, images)
    if not conditioner_type(cfg.conditioning.encoder).needs_captions:
        return None
    captioned = count_captioned(dataset)
    if captioned == 0:
        raise ValueError(f"--data {data}: none of its {images} images has a caption, and this model is "
                         f"text-conditional (conditioning.encoder = '{cfg.conditioning.encoder}'). Give captions as "
                         "NAME.txt beside each image or in metadata.jsonl ({\"file_name\": ..., \"text\": ...}; "
                         "columns text, caption or prompt)")
    if captioned < images:
        log.warning("%d of %d images have no caption: they train the unconditional model only",
                    images - captioned, images)
    return captioned


def init_weights(path: str, unet: nn.Module, trainable: nn.Module | None) -> None:
    """Start from the weights of the model at `path` (any format `load_model` reads): its UNet, and its trained
    conditioner when both models have one; a module the source lacks (a new adapter) keeps its initialisation."""
    try:
        parts = load_model(path)
    except (OSError, ValueError, CheckpointError) as exc:
        raise ConfigError(f"training.init_from = {path!r}: {exc}") from exc
    load_module_weights(unet, parts.unet, f"UNet weights of training.init_from = {path!r}")
    if trainable is not None and parts.conditioner is not None:
        load_module_weights(trainable, parts.conditioner, f"conditioner weights of training.init_from = {path!r}")
    log.info("initialised from %s (UNet%s)", path,
             " and conditioner" if trainable is not None and parts.conditioner is not None else "")


def _modules(run: _Run) -> dict[str, nn.Module]:
    trainable = run.conditioner.trainable
    return {"unet": run.unet, **({"conditioner": trainable} if trainable is not None else {}),
            **({"ema": run.ema} if run.ema is not None else {}),
            **({"conditioner_ema": run.conditioner_ema} if run.conditioner_ema is not None else {})}


def _train_step(run: _Run, indices: torch.Tensor, step: int) -> float:
    """One optimiser step on a global batch: this rank's micro-batches, then the all-reduced update.
    Returns the loss of this rank's share (NaN for a skipped step)."""
    cfg, ctx, dev = run.cfg, run.ctx, run.ctx.device
    n = len(indices)
    # All randomness of the global batch, drawn identically on every rank (world-size independent).
    z0 = run.autoencoder.config.to_diffusion(run.cache.sample(indices, run.rng))
    drop = drop_mask(n, cfg.diffusion.p_uncond, run.rng)
    d = cfg.diffusion
    t = (logit_normal(n, run.rng, d.logit_mean, d.logit_std) if d.objective == "flow"
         else torch.randint(0, run.alphas_cumprod.shape[0], (n,), generator=run.rng))
    noise = torch.randn(z0.shape, generator=run.rng)
    spatial = spatial_kind(cfg.conditioning.spatial)
    masks = spatial.training_masks(n, *run.cache.images.shape[-2:], run.rng) if spatial is not None else None
    run.model.train()
    total = 0.0
    chunks = rank_chunks(n, ctx, run.accumulation)
    for i, part in enumerate(chunks):
        network = _network(run, indices[part], drop[part], masks[part] if masks is not None else None,
                           z0.shape[-2:])
        with no_sync(run.model, last=i == len(chunks) - 1), autocast(dev, cfg.training.precision):
            if d.objective == "flow":
                loss = flow_loss(network, z0[part].to(dev), t[part].to(dev), noise[part].to(dev), d.num_timesteps)
            else:
                loss = diffusion_loss(network, z0[part].to(dev), t[part].to(dev), noise[part].to(dev),
                                      run.alphas_cumprod, d.prediction_type, d.min_snr_gamma)
            run.scaler.scale(loss / run.accumulation).backward()
        total += loss.item() / run.accumulation
    if not finite_everywhere(ctx, run.guard, total, step, [run.optimizer]):
        return float("nan")
    optimizer_step(run.optimizer, run.scaler, run.model.parameters(), cfg.training.grad_clip)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.unet)
    if run.conditioner_ema is not None:
        run.conditioner_ema.update(run.conditioner.trainable)
    return total


def _network(run: _Run, indices: torch.Tensor, drop: torch.Tensor, masks: torch.Tensor | None,
             latent_size) -> Callable:
    """network(x_t, t) for one micro-batch: its condition (dropped where `drop`) and spatial condition bound."""
    dev = run.ctx.device
    inputs = run.conditioner.training_inputs(run.cache.items(indices), drop)  # the trained part runs in the model
    spatial, condition = spatial_kind(run.cfg.conditioning.spatial), None
    if spatial is not None:
        condition = spatial.condition(run.cache.pixels(indices).to(dev), latent_size, run.autoencoder,
                                      masks.to(dev) if masks is not None else None)
    return with_spatial(functools.partial(run.model, inputs=inputs), condition)


def _gathered_states(run: _Run) -> dict[str, dict[str, torch.Tensor]]:
    """Whole state dicts of the trained modules (collective under FSDP: every rank calls it)."""
    return {name: gather(module.state_dict()) for name, module in _modules(run).items()}


def _sampling_weights(run: _Run, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights to sample from, {"unet": ..., "conditioner": ...} (the latter for a trained conditioner only):
    the EMA averages when training keeps them, else the weights themselves."""
    weights = {"unet": {**states["unet"], **(run.ema.averaged(states["ema"]) if run.ema is not None else {})}}
    if "conditioner" in states:
        weights["conditioner"] = {**states["conditioner"], **(run.conditioner_ema.averaged(states["conditioner_ema"])
                                                             if run.conditioner_ema is not None else {})}
    return weights


def _checkpoint(run: _Run, step: int, states: dict[str, dict[str, torch.Tensor]],
                weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Rank 0 writes the training state and the sampling weights (collective under FSDP: every rank calls it)."""
    out = run.out
    optimizer_state = gather_optimizer(run.optimizer.state_dict())
    if run.ctx.is_main:
        save_training_state(out / STATE_FILE, _modules(run), {"optimizer": run.optimizer}, step,
                            extra={"scaler": run.scaler.state_dict()}, state_dicts=states,
                            optimizer_states={"optimizer": optimizer_state}, generators={"batches": run.rng})
        if "conditioner" in weights:
            save_weights(weights["conditioner"], out / CONDITIONER_FILE)
        save_weights(weights["unet"], out / UNET_FILE, metadata={"step": str(step), "ema": str(run.ema is not None)})


def _write_samples(run: _Run, step: int, weights: dict[str, dict[str, torch.Tensor]]) -> Image.Image | None:
    """Rank 0 draws the sample grid with `weights` (see `_sampling_weights`), from the modules in memory; writes
    and returns it."""
    if not run.ctx.is_main:
        return None
    unet = build_backbone(run.cfg.network).to(run.ctx.device)
    unet.load_state_dict(weights["unet"])
    conditioner = run.conditioner
    if "conditioner" in weights:  # a copy with the sampling weights; the trained module stays as it is
        trained = copy.deepcopy(conditioner.trainable)
        trained.load_state_dict(weights["conditioner"])
        trained.eval()
        conditioner = conditioner.with_trainable(trained)
    ae_cfg = AutoencoderRunConfig(model=run.autoencoder.config, data=run.cfg.data)
    pipe = LatentDiffusion(run.cfg, unet.eval(), run.autoencoder, ae_cfg, conditioner, run.ctx.device,
                           run.cfg.training.precision)
    return write_sample_grid(run.out, step, pipe, sample_inputs(run.cfg.conditioning.spatial, run.cache))
