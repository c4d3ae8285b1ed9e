"""Training the latent diffusion model: `train_ldm(config, data, run_dir)`; resumable, logged, with sample grids."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.cache import CachedEncoder
from latent_diffusion.conditioning.spatial import check_spatial, low_res_condition, random_masks, spatial_condition, with_spatial
from latent_diffusion.config import ConfigError, LDMRunConfig, load_config, save_config
from latent_diffusion.data import open_dataset
from latent_diffusion.diffusion.guidance import drop_condition, network_kwargs
from latent_diffusion.diffusion.objective import diffusion_loss
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.io.autoencoder import CONFIG_FILE as AE_CONFIG, WEIGHTS_FILE as AE_WEIGHTS, load_autoencoder
from latent_diffusion.io.checkpoint import load_training_state, save_training_state, save_weights
from latent_diffusion.pipeline import (AUTOENCODER_DIR, CONDITIONER_FILE, CONFIG_FILE, UNET_FILE, Conditioner,
                                       Pipeline, build_conditioner, build_schedule)
from latent_diffusion.runtime import autocast, check_precision, resolve_device
from latent_diffusion.training.common import append_jsonl, learning_rate, set_learning_rate
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.latent_cache import LatentCache, encode_dataset
from latent_diffusion.unet import UNetModel

log = logging.getLogger(__name__)

STATE_FILE = "checkpoints/last.safetensors"
LOG_FILE = "log.jsonl"


def prepare_run_folder(cfg: LDMRunConfig, out: Path) -> LDMRunConfig:
    """Copy the stage-1 autoencoder into the run (so the run folder is a self-contained model) and check fit."""
    if (out / CONFIG_FILE).is_file():
        stored = load_config(out / CONFIG_FILE, LDMRunConfig)
        for section in ("unet", "conditioning", "diffusion"):
            if getattr(stored, section) != getattr(cfg, section):
                raise ConfigError(f"{out} was started with a different '{section}' section; use a new --out "
                                  f"folder or the stored {out / CONFIG_FILE}")
        return cfg
    source = Path(cfg.autoencoder)
    if not (source / AE_CONFIG).is_file():
        raise ConfigError(f"autoencoder = {cfg.autoencoder!r}: expected a run folder of `ldm train-autoencoder` "
                          f"(with {AE_CONFIG} and {AE_WEIGHTS})")
    ae_cfg = load_config(source / AE_CONFIG)
    if ae_cfg.model.latent_scale is None:
        raise ConfigError(f"{source}: the autoencoder has no latent_scale yet; run `ldm eval-autoencoder "
                          f"{source} --data HELD_OUT` first")
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
    target = out / AUTOENCODER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in (AE_CONFIG, AE_WEIGHTS):
        shutil.copyfile(source / name, target / name)
    return cfg


def train_ldm(cfg: LDMRunConfig, data: str | os.PathLike, out: str | os.PathLike, device: str = "auto",
              progress: bool = True) -> dict:
    """Train (or resume) the UNet of a latent diffusion model in run folder `out`; returns the last log line."""
    out, dev, tcfg = Path(out), resolve_device(device), cfg.training
    check_precision(tcfg.precision, dev)
    cfg = prepare_run_folder(cfg, out)
    autoencoder, ae_cfg = load_autoencoder(out / AUTOENCODER_DIR, dev)
    conditioner = build_conditioner(cfg.conditioning, dev, cfg.unet.context_dim)
    if cfg.conditioning.cache and conditioner.trainable is None:
        conditioner.encoder = CachedEncoder(conditioner.encoder, out / "cache" / "text")
    if cfg.unet.context_dim is not None and conditioner.dim != cfg.unet.context_dim:
        raise ConfigError(f"unet.context_dim = {cfg.unet.context_dim}: the {cfg.conditioning.encoder} encoder "
                          f"gives {conditioner.dim}-wide tokens")
    if cfg.data.flip or cfg.data.random_crop:
        log.warning("data.flip / data.random_crop are not applied: the latent cache holds each image once, "
                    "centre-cropped and unflipped")
    dataset = open_dataset(data, cfg.data.resolution, ae_cfg.model.in_channels, "train", seed=tcfg.seed)
    spatial_kind = cfg.conditioning.spatial
    cache = encode_dataset(autoencoder, dataset, out / "cache", batch_size=64, progress=progress,
                           keep_images=spatial_kind != "none")
    if len(cache) < tcfg.batch_size:
        raise ValueError(f"training.batch_size = {tcfg.batch_size} but {data} holds only {len(cache)} images")
    save_config(cfg, out / CONFIG_FILE)

    torch.manual_seed(tcfg.seed)
    unet = UNetModel(cfg.unet).to(dev)
    ema = EMA(unet, tcfg.ema_decay).to(dev) if tcfg.ema_decay else None
    trained = torch.nn.ModuleDict({"unet": unet, **({"conditioner": conditioner.trainable}
                                                     if conditioner.trainable is not None else {})})
    optimizer = torch.optim.AdamW(trained.parameters(), lr=tcfg.learning_rate, betas=tcfg.adam_betas,
                                  weight_decay=tcfg.weight_decay)
    modules = {**trained, **({"ema": ema} if ema else {})}
    step = 0
    if (out / STATE_FILE).is_file():
        step = load_training_state(out / STATE_FILE, modules, {"optimizer": optimizer})["step"]
        log.info("resuming %s from step %d", out, step)

    alphas_cumprod = build_schedule(cfg.diffusion).alphas_cumprod.to(dev)

    def pipeline_now() -> Pipeline:
        """The model as it stands, from the modules in memory (no reload from disk)."""
        return Pipeline(cfg, sampling_unet(unet, ema).eval(), autoencoder, ae_cfg, conditioner, dev, tcfg.precision)

    latent_scale = ae_cfg.model.latent_scale
    last: dict = {}
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="ldm", disable=not progress, dynamic_ncols=True)
    timer, seen, losses = time.perf_counter(), 0, []
    deadline = time.perf_counter() + 60 * tcfg.max_minutes if tcfg.max_minutes else float("inf")
    try:
        for indices in cache.batches(tcfg.batch_size, tcfg.seed, step):
            if step >= tcfg.max_steps:
                break
            if time.perf_counter() > deadline:
                log.info("training.max_minutes = %s reached at step %d", tcfg.max_minutes, step)
                _save(out, unet, ema, conditioner, modules, optimizer, step)
                if cfg.sampling.prompts:
                    write_sample_grid(out, step, pipeline_now(), sample_inputs(spatial_kind, cache))
                break
            lr = learning_rate(tcfg, step)
            set_learning_rate(optimizer, lr)
            z0 = cache.sample(indices).to(dev) * latent_scale
            cond, _ = drop_condition(conditioner.encode_items(cache.items(indices)), conditioner.unconditional(1),
                                     cfg.diffusion.p_uncond)
            spatial = spatial_batch(spatial_kind, cache, indices, z0.shape[-2:], autoencoder, latent_scale, dev)
            t = torch.randint(0, alphas_cumprod.shape[0], (z0.shape[0],), device=dev)
            unet.train()
            network = with_spatial(functools.partial(unet, **network_kwargs(cond)), spatial)
            with autocast(dev, tcfg.precision):
                loss = diffusion_loss(network, z0, t, torch.randn_like(z0), alphas_cumprod,
                                      cfg.diffusion.prediction_type, cfg.diffusion.min_snr_gamma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite diffusion loss at step {step} (learning rate too high?)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), tcfg.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(unet)
            step += 1
            seen += z0.shape[0]
            losses.append(loss.item())
            bar.update(1)
            if step % tcfg.log_every == 0 or step == tcfg.max_steps:
                last = {"step": step, "lr": lr, "loss": sum(losses) / len(losses),
                        "images_per_s": round(seen / (time.perf_counter() - timer), 2)}
                append_jsonl(out / LOG_FILE, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                timer, seen, losses = time.perf_counter(), 0, []
            if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
                _save(out, unet, ema, conditioner, modules, optimizer, step)
            if cfg.sampling.prompts and (step % tcfg.image_every == 0 or step == tcfg.max_steps):
                write_sample_grid(out, step, pipeline_now(), sample_inputs(spatial_kind, cache))
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: saving a checkpoint", step)
        _save(out, unet, ema, conditioner, modules, optimizer, step)
        raise
    finally:
        bar.close()
    return last


def spatial_batch(kind: str, cache: LatentCache, indices: torch.Tensor, latent_size: tuple[int, int],
                  autoencoder: AutoencoderKL, latent_scale: float, device: torch.device) -> torch.Tensor | None:
    """The spatial condition of a training batch (random masks for inpainting), or None."""
    if kind == "none":
        return None
    images = cache.pixels(indices).to(device)
    masks = random_masks(len(indices), *images.shape[-2:]).to(device) if kind == "inpaint" else None
    return spatial_condition(kind, images, latent_size, autoencoder, latent_scale, masks)


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


def sampling_unet(unet: UNetModel, ema: EMA | None) -> UNetModel:
    """The weights to sample from: an EMA-averaged copy when training keeps an EMA, else the UNet itself."""
    if ema is None:
        return unet
    averaged = UNetModel(unet.config).to(next(unet.parameters()).device)
    ema.copy_to(averaged)
    return averaged


def _save(out: Path, unet: UNetModel, ema: EMA | None, conditioner: Conditioner, modules, optimizer,
          step: int) -> None:
    save_training_state(out / STATE_FILE, modules, {"optimizer": optimizer}, step)
    if conditioner.trainable is not None:
        save_weights(conditioner.trainable.state_dict(), out / CONDITIONER_FILE)
    save_weights(sampling_unet(unet, ema).state_dict(), out / UNET_FILE,
                 metadata={"step": str(step), "ema": str(ema is not None)})


@torch.no_grad()
def write_sample_grid(out: Path, step: int, pipe: Pipeline, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """One row per sampling prompt, at the configured sampler and guidance; a spatial model's `inputs`
    (images, masks) condition every row and are shown as the first row."""
    s, inputs = pipe.config.sampling, inputs or {}
    count = inputs["image"].shape[0] if inputs else 4
    rows = [pipe.generate_tensors(prompt, num_images=count, steps=s.steps, guidance_scale=s.guidance_scale,
                                  sampler=s.sampler, seed=s.seed, progress=False, **inputs) for prompt in s.prompts]
    if inputs:
        shown = inputs["image"] * (1 - inputs["mask"]) if "mask" in inputs else \
            low_res_condition(inputs["image"], pipe.latent_size(None, None))
        rows.insert(0, torch.nn.functional.interpolate(shown, size=rows[0].shape[-2:], mode="nearest"))
    scale = max(1, 128 // rows[0].shape[-1])
    save_image(make_grid(rows, scale=scale), out / "samples" / f"samples_{step:07d}.png")
