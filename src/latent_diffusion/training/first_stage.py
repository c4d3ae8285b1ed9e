"""The first stage of an LDM run: the autoencoder the config names (or pixel space), checked against the UNet, and
copied into the run folder so that the folder is a self-contained model."""

from __future__ import annotations

import shutil
from pathlib import Path

from latent_diffusion.autoencoder import pixel_space_config
from latent_diffusion.conditioning.spatial import check_spatial
from latent_diffusion.config import AutoencoderRunConfig, ConfigError, LDMRunConfig, load_config, save_config
from latent_diffusion.files.atomic import atomic_path
from latent_diffusion.files.weights import save_weights
from latent_diffusion.formats.autoencoder import CONFIG_FILE as AE_CONFIG, WEIGHTS_FILE as AE_WEIGHTS
from latent_diffusion.formats.model import AUTOENCODER_DIR, CONFIG_FILE

PIXEL = "pixel"  # `autoencoder: pixel`: diffusion in pixel space (f = 1)


def stage_one_config(cfg: LDMRunConfig, out: Path) -> AutoencoderRunConfig:
    """The run's first stage, checked against `cfg` (nothing is written): the copy in `out` when the run exists
    (whose config must then have the same model sections), else the autoencoder `cfg` names, or pixel space."""
    if (out / CONFIG_FILE).is_file():
        stored = load_config(out / CONFIG_FILE, LDMRunConfig)
        for section in ("backbone", "unet", "dit", "conditioning", "diffusion"):
            if getattr(stored, section) != getattr(cfg, section):
                raise ConfigError(f"{out} was started with a different '{section}' section; use a new --out "
                                  f"folder or the stored {out / CONFIG_FILE}")
        return load_config(out / AUTOENCODER_DIR / AE_CONFIG)
    if cfg.autoencoder == PIXEL:
        channels = cfg.network.in_channels - cfg.network.concat_channels
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
    latent_channels = ae_cfg.model.embed_dim + cfg.network.concat_channels
    if cfg.network.in_channels != latent_channels:
        raise ConfigError(f"{cfg.backbone}.in_channels = {cfg.network.in_channels}: expected {latent_channels} "
                          f"(autoencoder embed_dim {ae_cfg.model.embed_dim} + concat_channels)")
    check_spatial(cfg.conditioning.spatial, cfg.network.concat_channels, ae_cfg.model.in_channels,
                  ae_cfg.model.embed_dim)
    if cfg.data.resolution % (ae_cfg.model.downsample_factor * cfg.network.downsample_factor):
        raise ConfigError(f"data.resolution = {cfg.data.resolution}: expected a multiple of "
                          f"{ae_cfg.model.downsample_factor * cfg.network.downsample_factor} (autoencoder f × the backbone's "
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
