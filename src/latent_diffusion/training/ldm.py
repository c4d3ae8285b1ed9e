"""Training the latent diffusion model: `train_ldm(config, data, run_dir)`; resumable, logged, with sample grids."""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL, pixel_space_config
from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.cache import CachedEncoder
from latent_diffusion.conditioning.spatial import (check_spatial, low_res_condition, random_masks, spatial_condition,
                                                   with_spatial)
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, LDMRunConfig, load_config, save_config
from latent_diffusion.data import count_captioned, open_dataset
from latent_diffusion.diffusion.guidance import apply_drop, network_kwargs
from latent_diffusion.diffusion.objective import diffusion_loss
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.files.atomic import atomic_path
from latent_diffusion.formats.autoencoder import CONFIG_FILE as AE_CONFIG, WEIGHTS_FILE as AE_WEIGHTS, load_autoencoder
from latent_diffusion.files.weights import CheckpointError, load_module_weights, save_weights
from latent_diffusion.training.state import load_training_state, resume_training_state, save_training_state
from latent_diffusion.formats.model import load_model
from latent_diffusion.conditioning.conditioner import Conditioner, build_conditioner
from latent_diffusion.diffusion.schedule import build_schedule
from latent_diffusion.formats.model import AUTOENCODER_DIR, CONDITIONER_FILE, CONFIG_FILE, UNET_FILE
from latent_diffusion.generation.model import LatentDiffusion
from latent_diffusion.runtime import autocast, check_precision, resolve_device
from latent_diffusion.training.common import check_batch_fits, learning_rate, run_in_folder, set_learning_rate
from latent_diffusion.training.distributed import (DistributedContext, gather, gather_optimizer, index_batches,
                                                   micro_batches, no_sync, rank_chunks, wrap)
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.latent_cache import LatentCache, encode_dataset
from latent_diffusion.training.run_log import RunLog, TimeEstimate, is_log_step, log_summary, parameter_counts
from latent_diffusion.unet import UNetModel

log = logging.getLogger(__name__)

STATE_FILE = "checkpoints/last.safetensors"
PIXEL = "pixel"  # `autoencoder: pixel`: diffusion in pixel space (f = 1)


def stage_one_config(cfg: LDMRunConfig, out: Path) -> AutoencoderRunConfig:
    """The run's first stage, checked against `cfg` (nothing is written): the copy in `out` when the run exists
    (whose config must then have the same model sections), else the autoencoder `cfg` names, or pixel space."""
    if (out / CONFIG_FILE).is_file():
        stored = load_config(out / CONFIG_FILE, LDMRunConfig)
        for section in ("unet", "conditioning", "diffusion"):
            if getattr(stored, section) != getattr(cfg, section):
                raise ConfigError(f"{out} was started with a different '{section}' section; use a new --out "
                                  f"folder or the stored {out / CONFIG_FILE}")
        return load_config(out / AUTOENCODER_DIR / AE_CONFIG)
    if cfg.autoencoder == PIXEL:
        channels = cfg.unet.in_channels - cfg.unet.concat_channels
        return AutoencoderRunConfig(model=pixel_space_config(channels, cfg.data.resolution), data=cfg.data)
    source = Path(cfg.autoencoder)
    if not (source / AE_CONFIG).is_file():
        where = "" if source.is_absolute() else " (a relative path is looked for beside the config file, then in " \
                                                "the current directory; --set autoencoder=PATH names another)"
        raise ConfigError(f"autoencoder = {cfg.autoencoder!r}: expected a run folder of `ldm train-autoencoder` "
                          f"(with {AE_CONFIG} and {AE_WEIGHTS}), or '{PIXEL}' for pixel-space diffusion{where}")
    ae_cfg = load_config(source / AE_CONFIG)
    if ae_cfg.model.latent_scale is None:
        raise ConfigError(f"{source}: the autoencoder has no latent_scale yet; run `ldm eval-autoencoder "
                          f"{source} --data HELD_OUT --write-scale` first")
    latent_channels = ae_cfg.model.embed_dim + cfg.unet.concat_channels
    if cfg.unet.in_channels != latent_channels:
        raise ConfigError(f"unet.in_channels = {cfg.unet.in_channels}: expected {latent_channels} "
                          f"(autoencoder embed_dim {ae_cfg.model.embed_dim} + concat_channels)")
    check_spatial(cfg.conditioning.spatial, cfg.unet.concat_channels, ae_cfg.model.in_channels,
                  ae_cfg.model.embed_dim)
    if cfg.data.resolution % (ae_cfg.model.downsample_factor * cfg.unet.downsample_factor):
        raise ConfigError(f"data.resolution = {cfg.data.resolution}: expected a multiple of "
                          f"{ae_cfg.model.downsample_factor * cfg.unet.downsample_factor} (autoencoder f × UNet "
                          "downsampling)")
    return ae_cfg


def prepare_run_folder(cfg: LDMRunConfig, out: Path, ae_cfg: AutoencoderRunConfig) -> None:
    """Copy the stage-1 autoencoder into a new run (so the run folder is a self-contained model), atomically; for
    `autoencoder: pixel`, write the identity first stage's config there instead."""
    target = out / AUTOENCODER_DIR
    if (out / CONFIG_FILE).is_file():
        return
    if cfg.autoencoder == PIXEL:  # the same folder layout as a trained autoencoder's, with no weights in it
        save_weights({}, target / AE_WEIGHTS)
        save_config(ae_cfg, target / AE_CONFIG)
        return
    for name in (AE_WEIGHTS, AE_CONFIG):
        with atomic_path(target / name) as tmp:
            shutil.copyfile(Path(cfg.autoencoder) / name, tmp)


class TrainedNetwork(nn.Module):
    """What the optimiser trains, as one module (so DDP reduces every gradient): the UNet, and the trained part
    of the conditioner: a class embedder (given `labels`, embedded and dropped for CFG inside forward) or a text
    adapter (given the frozen text tokens `cond`, already dropped)."""

    def __init__(self, unet: UNetModel, conditioner: nn.Module | None = None):
        super().__init__()
        self.unet, self.conditioner = unet, conditioner

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None,
                labels: list[int] | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            cond = apply_drop(self.conditioner(labels), self.conditioner.unconditional(1), drop)
        elif self.conditioner is not None:
            cond = self.conditioner(cond)
        return self.unet(x, t, **network_kwargs(cond))


@dataclass
class _Run:
    """Everything a training step needs."""

    cfg: LDMRunConfig
    ctx: DistributedContext
    unet: UNetModel
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
    run_log: RunLog | None = None  # log.jsonl and TensorBoard, while the training loop runs
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.alphas_cumprod = build_schedule(self.cfg.diffusion).alphas_cumprod.to(self.ctx.device)


def train_ldm(cfg: LDMRunConfig, data: str | os.PathLike, out: str | os.PathLike, device: str = "auto",
              progress: bool = True) -> dict:
    """Train (or resume) the UNet of a latent diffusion model in run folder `out`; returns the last log line.

    Runs unchanged under `torchrun` (one process per device). SIGTERM/SIGINT save a checkpoint and return
    (the line then has "stopped"); a NaN/inf loss skips its step.
    """
    out = Path(out)
    ctx = DistributedContext.from_env(resolve_device(device))
    check_precision(cfg.training.precision, ctx.device)
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
    step = 0
    if state is not None:
        load_training_state(state["path"], {}, {"optimizer": run.optimizer}, restore_rng=False)
        step = state["step"]
        run.scaler.load_state_dict(state["extra"].get("scaler", {}))
        log.info("resuming %s from step %d", out, step)
    signals.check(step)
    return _train_loop(run, out, step, signals, progress)


def check_trainable(cfg: LDMRunConfig) -> None:
    """Refuse, before any work, a configuration that would train against an untrained condition encoder."""
    c = cfg.conditioning
    if c.encoder == "clip" and c.path is None:
        raise ConfigError("conditioning.encoder = 'clip' with no conditioning.path: the CLIP text encoder would "
                          "have random weights, and the UNet would learn to follow noise. Set conditioning.path to "
                          "CLIP text weights (a .safetensors file of CLIPTextModel weights, or a whole SD 1.x "
                          "checkpoint), or use encoder 'minilm' (pretrained, installed as a package)")


def _build_run(cfg: LDMRunConfig, dataset: Dataset, captioned: int | None, out: Path, ctx: DistributedContext,
               accumulation: int, progress: bool, signals: StopSignals) -> _Run:
    dev, tcfg = ctx.device, cfg.training
    autoencoder, _ = load_autoencoder(out / AUTOENCODER_DIR, dev)
    conditioner = build_conditioner(cfg.conditioning, dev, cfg.unet.context_dim)
    if cfg.conditioning.cache and cfg.conditioning.encoder != "class":
        conditioner.encoder = CachedEncoder(conditioner.encoder, out / "cache" / "text")
    if cfg.unet.context_dim is not None and conditioner.dim != cfg.unet.context_dim:
        raise ConfigError(f"unet.context_dim = {cfg.unet.context_dim}: the {cfg.conditioning.encoder} encoder "
                          f"gives {conditioner.dim}-wide tokens")
    if cfg.data.flip or cfg.data.random_crop:
        log.warning("data.flip / data.random_crop are not applied: the latent cache holds each image once, "
                    "centre-cropped and unflipped")
    torch.manual_seed(tcfg.seed)
    unet = UNetModel(cfg.unet).to(dev)
    if tcfg.init_from:
        init_weights(tcfg.init_from, unet, conditioner.trainable)
    trainable = conditioner.trainable
    ema = EMA(unet, tcfg.ema_decay).to(dev) if tcfg.ema_decay else None
    conditioner_ema = EMA(trainable, tcfg.ema_decay).to(dev) if tcfg.ema_decay and trainable is not None else None
    if ctx.is_main:  # before the latent cache, which can take a while
        text = conditioner.encoder.encoder if isinstance(conditioner.encoder, CachedEncoder) else conditioner.encoder
        log_summary(len(dataset), tcfg.batch_size, tcfg.max_steps,
                    *parameter_counts([unet, trainable], [autoencoder, text]), captioned)
    signals.check()
    cache = encode_dataset(autoencoder, dataset, out / "cache", batch_size=64, progress=progress and ctx.is_main,
                           keep_images=cfg.conditioning.spatial != "none", ctx=ctx, signals=signals)
    scaler = torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16")
    return _Run(cfg, ctx, unet, ema, conditioner_ema, conditioner, autoencoder, cache, scaler,
                torch.Generator().manual_seed(tcfg.seed), accumulation, NonFiniteGuard(tcfg.max_bad_steps, "diffusion"))


def check_data(cfg: LDMRunConfig, data, dataset: Dataset) -> int | None:
    """The number of captioned images (None for a class-conditional model); refuses too few images for a batch,
    and a text-conditional model on data without a single caption (warns about uncaptioned images)."""
    images = len(dataset)
    check_batch_fits(cfg.training, data, images)
    if cfg.conditioning.encoder == "class":
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


def init_weights(path: str, unet: UNetModel, trainable: nn.Module | None) -> None:
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


def _train_loop(run: _Run, out: Path, step: int, signals: StopSignals, progress: bool) -> dict:
    tcfg, ctx = run.cfg.training, run.ctx
    last: dict = {}
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="ldm", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    timer, seen, losses = time.perf_counter(), 0, []
    deadline = time.perf_counter() + 60 * tcfg.max_minutes if tcfg.max_minutes else float("inf")
    run.run_log, estimate = RunLog(out, step, ctx.is_main), TimeEstimate(step, tcfg.max_steps, enabled=ctx.is_main)
    try:
        for indices in index_batches(len(run.cache), tcfg.batch_size, tcfg.seed, step):
            stop = ctx.any(signals.requested is not None or time.perf_counter() > deadline)
            if step >= tcfg.max_steps or stop:
                if stop:
                    log.info("stopping at step %d (%s)", step, signals.requested or "training.max_minutes reached")
                    _checkpoint(run, out, step, samples=True)
                    last = {**last, "step": step, "stopped": signals.requested or "max_minutes"}
                break
            lr = learning_rate(tcfg, step)
            set_learning_rate(run.optimizer, lr)
            loss = _train_step(run, indices, step)
            step += 1
            seen += len(indices)
            losses.append(loss)
            bar.update(1)
            estimate.step(step)
            if is_log_step(tcfg, step):
                finite = [v for v in losses if math.isfinite(v)]
                last = {"step": step, "lr": lr, "loss": sum(finite) / max(1, len(finite)),
                        "images_per_s": round(seen / (time.perf_counter() - timer), 2),
                        "skipped_steps": run.guard.skipped}
                run.run_log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                timer, seen, losses = time.perf_counter(), 0, []
            samples = bool(run.cfg.sampling.prompts) and (step % tcfg.image_every == 0 or step == tcfg.max_steps)
            if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
                _checkpoint(run, out, step, samples)  # gathers the weights once for both
            elif samples:
                _write_samples(run, out, step, _sampling_weights(run, _gathered_states(run)))
    finally:
        bar.close()
        run.run_log.close()
    return last


def _train_step(run: _Run, indices: torch.Tensor, step: int) -> float:
    """One optimiser step on a global batch: this rank's micro-batches, then the all-reduced update.
    Returns the loss of this rank's share (NaN for a skipped step)."""
    cfg, ctx, dev = run.cfg, run.ctx, run.ctx.device
    n = len(indices)
    # All randomness of the global batch, drawn identically on every rank (world-size independent).
    z0 = run.cache.sample(indices, run.rng) * run.autoencoder.config.latent_scale
    drop = torch.rand(n, generator=run.rng) < cfg.diffusion.p_uncond
    t = torch.randint(0, run.alphas_cumprod.shape[0], (n,), generator=run.rng)
    noise = torch.randn(z0.shape, generator=run.rng)
    masks = (random_masks(n, *run.cache.images.shape[-2:], run.rng) if cfg.conditioning.spatial == "inpaint"
             else None)
    run.model.train()
    total = 0.0
    chunks = rank_chunks(n, ctx, run.accumulation)
    for i, part in enumerate(chunks):
        network = _network(run, indices[part], drop[part], masks[part] if masks is not None else None,
                           z0.shape[-2:])
        with no_sync(run.model, last=i == len(chunks) - 1), autocast(dev, cfg.training.precision):
            loss = diffusion_loss(network, z0[part].to(dev), t[part].to(dev), noise[part].to(dev),
                                  run.alphas_cumprod, cfg.diffusion.prediction_type, cfg.diffusion.min_snr_gamma)
            run.scaler.scale(loss / run.accumulation).backward()
        total += loss.item() / run.accumulation
    bad = ctx.any(not math.isfinite(total))
    if not run.guard.ok(not bad, step, total):
        run.optimizer.zero_grad(set_to_none=True)
        return float("nan")
    if cfg.training.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.training.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.unet)
    if run.conditioner_ema is not None:
        run.conditioner_ema.update(run.conditioner.trainable)
    return total


def _network(run: _Run, indices: torch.Tensor, drop: torch.Tensor, masks: torch.Tensor | None,
             latent_size) -> Callable:
    """network(x_t, t) for one micro-batch: its condition (dropped where `drop`) and spatial condition bound."""
    dev, conditioner = run.ctx.device, run.conditioner
    items = run.cache.items(indices)
    if conditioner.cfg.encoder == "class":
        kwargs = {"labels": [item["label"] for item in items], "drop": drop}
    else:
        kwargs = {"cond": apply_drop(conditioner.encode_items(items, adapt=False),
                                     conditioner.unconditional(1, adapt=False), drop)}  # the adapter runs in model
    spatial = None
    if run.cfg.conditioning.spatial != "none":
        images = run.cache.pixels(indices).to(dev)
        spatial = spatial_condition(run.cfg.conditioning.spatial, images, latent_size, run.autoencoder,
                                    run.autoencoder.config.latent_scale,
                                    masks.to(dev) if masks is not None else None)
    return with_spatial(functools.partial(run.model, **kwargs), spatial)


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


def _checkpoint(run: _Run, out: Path, step: int, samples: bool = False) -> None:
    """Rank 0 writes the training state and the sampling weights; every rank waits for it."""
    states = _gathered_states(run)
    optimizer_state = gather_optimizer(run.optimizer.state_dict())
    weights = _sampling_weights(run, states)
    if run.ctx.is_main:
        save_training_state(out / STATE_FILE, _modules(run), {"optimizer": run.optimizer}, step,
                            extra={"scaler": run.scaler.state_dict()}, state_dicts=states,
                            optimizer_states={"optimizer": optimizer_state}, generators={"batches": run.rng})
        if "conditioner" in weights:
            save_weights(weights["conditioner"], out / CONDITIONER_FILE)
        save_weights(weights["unet"], out / UNET_FILE, metadata={"step": str(step), "ema": str(run.ema is not None)})
    if samples and run.cfg.sampling.prompts:
        _write_samples(run, out, step, weights)
    run.ctx.barrier()


def _write_samples(run: _Run, out: Path, step: int, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Rank 0 draws the sample grid with `weights` (see `_sampling_weights`), from the modules in memory."""
    if not run.ctx.is_main:
        return
    unet = UNetModel(run.cfg.unet).to(run.ctx.device)
    unet.load_state_dict(weights["unet"])
    conditioner = run.conditioner
    if "conditioner" in weights:  # a copy with the sampling weights; the trained module stays as it is
        trained = copy.deepcopy(conditioner.trainable)
        trained.load_state_dict(weights["conditioner"])
        trained.eval()
        conditioner = (Conditioner(conditioner.cfg, trained) if conditioner.cfg.encoder == "class"
                       else Conditioner(conditioner.cfg, conditioner.encoder, trained))
    ae_cfg = AutoencoderRunConfig(model=run.autoencoder.config, data=run.cfg.data)
    pipe = LatentDiffusion(run.cfg, unet.eval(), run.autoencoder, ae_cfg, conditioner, run.ctx.device,
                           run.cfg.training.precision)
    grid = write_sample_grid(out, step, pipe, sample_inputs(run.cfg.conditioning.spatial, run.cache))
    if run.run_log is not None:
        run.run_log.add_image("samples", grid, step)


def sample_inputs(kind: str, cache: LatentCache, count: int = 4) -> dict[str, torch.Tensor]:
    """Fixed inputs for a spatial model's sample grids: the first training images (and a centre mask)."""
    if kind == "none":
        return {}
    images = cache.pixels(torch.arange(min(count, len(cache))))
    if kind == "low_res":
        return {"image": images}
    h, w = images.shape[-2:]
    mask = torch.zeros(images.shape[0], 1, h, w)
    mask[:, :, h // 4:h - h // 4, w // 4:w - w // 4] = 1.0
    return {"image": images, "mask": mask}


@torch.no_grad()
def write_sample_grid(out: Path, step: int, pipe: LatentDiffusion,
                      inputs: dict[str, torch.Tensor] | None = None) -> Image.Image:
    """One row per sampling prompt (written under it), at the configured sampler and guidance; a spatial model's
    `inputs` (images, masks) condition every row and are shown as the first row. Written and returned."""
    s, inputs = pipe.config.sampling, inputs or {}
    count = inputs["image"].shape[0] if inputs else 4
    rows = [pipe.generate_tensors(prompt, num_images=count, steps=s.steps, guidance_scale=s.guidance_scale,
                                  sampler=s.sampler, seed=s.seed, progress=False, **inputs) for prompt in s.prompts]
    if inputs:
        shown = inputs["image"] * (1 - inputs["mask"]) if "mask" in inputs else \
            low_res_condition(inputs["image"], pipe.latent_size(None, None))
        rows.insert(0, torch.nn.functional.interpolate(shown, size=rows[0].shape[-2:], mode="nearest"))
    captions = ([f"input ({'masked' if 'mask' in inputs else 'low resolution'})"] if inputs else []) + list(s.prompts)
    grid = make_grid(rows, scale=max(1, 128 // rows[0].shape[-1]), captions=captions)
    save_image(grid, out / "samples" / f"samples_{step:07d}.png")
    return grid
