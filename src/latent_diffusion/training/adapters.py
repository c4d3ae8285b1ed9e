"""Adapting a trained model with the model frozen: LoRA (`ldm train-lora`), textual inversion
(`ldm train-embedding`) and ControlNet (`ldm train-controlnet`), on any model `load_model` reads (ours, an SD
checkpoint file, a diffusers folder).

Both train a small set of weights with the model's own objective on the user's captioned images, through the same
loop as the LDM trainer (`training.loop`: latent cache, optional EMA, resume, SIGTERM, NaN guard, torchrun); the
adapter reaches the model from outside (`nn.lora` hooks, `conditioning.embeddings` token vectors). A run folder
holds `adapter.yaml`, the training state, the latent cache, the log and sample grids, and the adapter file in the
format the world shares, rewritten at every checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.dropout import drop_mask
from latent_diffusion.conditioning.registry import conditioner_type
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, LDMRunConfig, load_config, save_config
from latent_diffusion.data import count_captioned, open_dataset
from latent_diffusion.diffusion.guidance import network_kwargs
from latent_diffusion.diffusion.objective import diffusion_loss
from latent_diffusion.diffusion.schedule import build_schedule
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.model import ModelParts, load_model
from latent_diffusion.generation.control import Control
from latent_diffusion.generation.model import LatentDiffusion
from latent_diffusion.runtime import autocast
from latent_diffusion.training.adapter_config import ADAPTER_CONFIG_FILE, AdapterRunConfig
from latent_diffusion.training.common import check_batch_fits, run_in_folder
from latent_diffusion.training.distributed import DistributedContext, micro_batches, rank_chunks
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.grids import write_sample_grid
from latent_diffusion.training.latent_cache import LatentCache, encode_dataset
from latent_diffusion.training.loop import (STATE_FILE, LatentCacheSteps, distributed_context, finite_everywhere,
                                            optimizer_step, resume_optimizers, train_loop)
from latent_diffusion.training.personal import Adapter, make_adapter
from latent_diffusion.training.run_log import log_summary, parameter_counts
from latent_diffusion.training.state import resume_training_state, save_training_state
from latent_diffusion.unet import UNetModel

log = logging.getLogger(__name__)


@dataclass
class _Run(LatentCacheSteps):
    """The adapter's `Trainer` (see `training.loop`)."""

    cfg: AdapterRunConfig
    model_cfg: LDMRunConfig  # the base model's, its sampling prompts those of the grids
    ctx: DistributedContext
    out: Path
    unet: UNetModel
    autoencoder: nn.Module
    conditioner: Conditioner
    adapter: Adapter
    ema: EMA | None
    cache: LatentCache
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rng: torch.Generator
    accumulation: int
    guard: NonFiniteGuard
    losses: list[float] = field(default_factory=list)
    alphas_cumprod: torch.Tensor = field(init=False)

    grid_name = "samples"
    postfix = {"loss": ".4f"}

    def __post_init__(self) -> None:
        self.alphas_cumprod = build_schedule(self.model_cfg.diffusion).alphas_cumprod.to(self.ctx.device)

    @property
    def label(self) -> str:
        return self.cfg.kind

    def step_loss(self, indices: torch.Tensor, step: int) -> float:
        return _train_step(self, indices, step)

    def save(self, step: int, checkpoint: bool, samples: bool) -> Image.Image | None:
        """The training state and the adapter file, and the grid drawn with the adapter (its EMA average when
        kept); rank 0 writes, every rank waits."""
        grid = None
        if self.ctx.is_main and (checkpoint or samples):
            if checkpoint:
                save_training_state_of(self, step)
            with _averaged(self.adapter.module, self.ema):
                if checkpoint:
                    self.adapter.write(self.out, step)
                if samples:
                    grid = _write_samples(self, step)
        self.ctx.barrier()
        return grid


def save_training_state_of(run: _Run, step: int) -> None:
    save_training_state(run.out / STATE_FILE, _modules(run), {"optimizer": run.optimizer}, step,
                        extra={"scaler": run.scaler.state_dict()}, generators={"batches": run.rng})


def train_adapter(cfg: AdapterRunConfig, data: str | os.PathLike, out: str | os.PathLike, device: str = "auto",
                  progress: bool = True) -> dict:
    """Train (or resume) a LoRA or an embedding (`cfg.kind`) for the model `cfg.model` on `data` in run folder
    `out`; returns the last log line ("stopped" in it when a signal or `max_minutes` ended the run early)."""
    out = Path(out)
    with distributed_context(device, cfg.training) as ctx:
        return run_in_folder(out, ctx.is_main, lambda signals: _train(cfg, data, out, ctx, signals, progress))


def check_resumable(stored: AdapterRunConfig, given: AdapterRunConfig, run_dir: Path) -> None:
    """A run resumes with new training settings, never with another model or adapter."""
    section = given.kind
    pairs = [(name, getattr(stored, name), getattr(given, name)) for name in ("model", "kind", "resolution")]
    pairs += [(f"{section}.{f.name}", getattr(getattr(stored, section), f.name), getattr(getattr(given, section),
                                                                                         f.name))
              for f in dataclasses.fields(getattr(given, section))]
    for name, was, now in pairs:
        if was != now:
            raise ConfigError(f"{run_dir} was started with {name} = {was!r}, not {now!r}: rerun with the same "
                              "settings to resume, or use a new --out folder to train another adapter")


def _load_base(cfg: AdapterRunConfig) -> ModelParts:
    try:
        return load_model(cfg.model)
    except (OSError, ValueError, CheckpointError) as exc:
        raise ConfigError(f"--model {cfg.model}: {exc}") from exc


def _train(cfg: AdapterRunConfig, data, out: Path, ctx: DistributedContext, signals: StopSignals,
           progress: bool) -> dict:
    tcfg = cfg.training
    if (out / ADAPTER_CONFIG_FILE).is_file():
        check_resumable(load_config(out / ADAPTER_CONFIG_FILE, AdapterRunConfig), cfg, out)
    parts = _load_base(cfg)
    if parts.conditioning.spatial != "none":
        raise ConfigError(f"--model {cfg.model}: a model conditioned on images ({parts.conditioning.spatial}) cannot "
                          "be personalised yet; use a text-to-image model")
    resolution = cfg.resolution or parts.resolution
    dataset = open_dataset(data, resolution, parts.autoencoder_config.in_channels, "train", seed=tcfg.seed)
    check_batch_fits(tcfg, data, len(dataset))
    if conditioner_type(parts.conditioning.encoder).needs_captions and count_captioned(dataset) == 0:
        raise ValueError(f"--data {data}: none of its {len(dataset)} images has a caption (NAME.txt beside each "
                         "image, or metadata.jsonl)")
    dev = ctx.device
    torch.manual_seed(tcfg.seed)
    unet, autoencoder, conditioner = parts.networks(dev)
    frozen = [unet, autoencoder, getattr(conditioner, "encoder", None), conditioner.trainable]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False).eval()
    adapter = make_adapter(cfg, unet, conditioner, parts)
    if not adapter.trains_text and conditioner_type(parts.conditioning.encoder).needs_captions:
        conditioner.cache_frozen(out / "cache" / "text")
    _, accumulation = micro_batches(tcfg, ctx.world_size)
    if ctx.is_main:
        log_summary(len(dataset), tcfg.batch_size, tcfg.max_steps,
                    *parameter_counts([adapter.module], frozen[:3]))
    signals.check()
    cache = encode_dataset(autoencoder, dataset, out / "cache", batch_size=64, progress=progress and ctx.is_main,
                           ctx=ctx, signals=signals, num_workers=tcfg.num_workers)
    adapter.check_captions(cache.captions)
    if adapter.reads_controls and cache.controls is None:
        raise ValueError(f"--data {data}: its images have no control maps (a conditioning_image column in "
                         "metadata.jsonl naming each image's map; `ldm make-shapes --control mask` writes one)")
    ema = EMA(adapter.module, tcfg.ema_decay).to(dev) if tcfg.ema_decay else None
    optimizer = torch.optim.AdamW(adapter.module.parameters(), lr=tcfg.learning_rate, betas=tcfg.adam_betas,
                                  weight_decay=tcfg.weight_decay)
    model_cfg = parts.run_config()
    prompts = (cfg.prompts or tuple(dict.fromkeys(c for c in cache.captions if c))[:4]) if cfg.sample_steps else ()
    model_cfg = dataclasses.replace(  # the grids are drawn at the training size
        model_cfg, data=dataclasses.replace(model_cfg.data, resolution=resolution), sampling=dataclasses.replace(
            model_cfg.sampling, prompts=prompts, steps=cfg.sample_steps or model_cfg.sampling.steps))
    run = _Run(cfg, model_cfg, ctx, out, unet, autoencoder, conditioner, adapter, ema, cache, optimizer,
               torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16"),
               torch.Generator().manual_seed(tcfg.seed), accumulation, NonFiniteGuard(tcfg.max_bad_steps, cfg.kind))
    state = _resume(run)
    step = resume_optimizers(state, {"optimizer": optimizer}, run.scaler)
    if ctx.is_main:
        save_config(cfg, out / ADAPTER_CONFIG_FILE)
    signals.check(step)
    return train_loop(run, tcfg, ctx, out, step, signals, progress)


def _resume(run: _Run) -> dict | None:
    return resume_training_state(run.out / STATE_FILE, _modules(run), {}, {"batches": run.rng})


def _modules(run: _Run) -> dict[str, nn.Module]:
    return {"adapter": run.adapter.module, **({"ema": run.ema} if run.ema is not None else {})}


def _p_uncond(run: _Run) -> float:
    return run.model_cfg.diffusion.p_uncond if run.cfg.p_uncond is None else run.cfg.p_uncond


def _train_step(run: _Run, indices: torch.Tensor, step: int) -> float:
    """One optimiser step on a global batch (this rank's micro-batches, gradients averaged over ranks); the
    loss of this rank's share, NaN for a skipped step."""
    ctx, dev, diffusion = run.ctx, run.ctx.device, run.model_cfg.diffusion
    n = len(indices)
    z0 = run.autoencoder.config.to_diffusion(run.cache.sample(indices, run.rng))
    drop = drop_mask(n, _p_uncond(run), run.rng)
    t = torch.randint(0, run.alphas_cumprod.shape[0], (n,), generator=run.rng)
    noise = torch.randn(z0.shape, generator=run.rng)
    run.adapter.module.train()
    total = 0.0
    for part in rank_chunks(n, ctx, run.accumulation):
        with autocast(dev, run.cfg.training.precision):
            cond = _condition(run, indices[part], drop[part])
            controls = run.cache.control_maps(indices[part]).to(dev) if run.adapter.reads_controls else None

            def network(x: torch.Tensor, timesteps: torch.Tensor, cond=cond, controls=controls) -> torch.Tensor:
                return run.unet(x, timesteps, **network_kwargs(cond),
                                **run.adapter.unet_kwargs(x, timesteps, cond, controls))

            loss = diffusion_loss(network, z0[part].to(dev), t[part].to(dev), noise[part].to(dev),
                                  run.alphas_cumprod, diffusion.prediction_type, diffusion.min_snr_gamma)
            run.scaler.scale(loss / run.accumulation).backward()
        total += loss.item() / run.accumulation
    parameters = list(run.adapter.module.parameters())
    ctx.average_gradients(parameters)
    if not finite_everywhere(ctx, run.guard, total, step, [run.optimizer]):
        return float("nan")
    optimizer_step(run.optimizer, run.scaler, parameters, run.cfg.training.grad_clip)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.adapter.module)
    return total


def _condition(run: _Run, indices: torch.Tensor, drop: torch.Tensor):
    """The condition of a micro-batch, ∅ where `drop`: through the text encoder with gradients when the adapter
    trains a part of it, else as the LDM trainer computes it (frozen tokens, possibly cached)."""
    items = run.cache.items(indices)
    if run.adapter.trains_text:
        captions = ["" if dropped else item["caption"] for item, dropped in zip(items, drop.tolist(), strict=True)]
        return run.conditioner.adapt(run.adapter.encode(run.conditioner, captions))
    inputs = run.conditioner.training_inputs(items, drop)
    trainable = run.conditioner.trainable
    return inputs if trainable is None else trainable(inputs)


@contextlib.contextmanager
def _averaged(module: nn.Module, ema: EMA | None) -> Iterator[None]:
    """Within: `module` holds the EMA average (when there is one); after: its trained weights again."""
    if ema is None:
        yield
        return
    trained = {name: value.clone() for name, value in module.state_dict().items()}
    ema.copy_to(module)
    try:
        yield
    finally:
        module.load_state_dict(trained)


@torch.no_grad()
def _write_samples(run: _Run, step: int) -> Image.Image | None:
    """The sample grid of the base model with the adapter, one row per prompt."""
    if not run.model_cfg.sampling.prompts:
        return None
    run.adapter.module.eval()
    ae_cfg = AutoencoderRunConfig(model=run.autoencoder.config, data=run.model_cfg.data)
    pipe = LatentDiffusion(run.model_cfg, run.unet, run.autoencoder, ae_cfg, run.conditioner, run.ctx.device,
                           run.cfg.training.precision)
    if not run.adapter.reads_controls:
        return write_sample_grid(run.out, step, pipe)
    maps = run.cache.control_maps(torch.arange(min(4, len(run.cache)))).to(run.ctx.device)
    return write_sample_grid(run.out, step, pipe, {"controls": [Control(run.adapter.module, maps)]},
                             ("control maps", maps * 2 - 1))
