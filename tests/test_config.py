"""Configs are validated on load: unknown keys, wrong types and impossible architectures are clear errors."""

from pathlib import Path

import pytest

from latent_diffusion.config import (AutoencoderConfig, AutoencoderRunConfig, ConfigError, LDMRunConfig, TrainConfig,
                                     from_dict,
                                     load_config, resolve_paths, save_config)

ROOT = Path(__file__).parents[1]


def test_shipped_configs_load_and_find_their_models_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    autoencoders = sorted((ROOT / "configs" / "autoencoder").glob("*.yaml"))
    ldms = sorted((ROOT / "configs" / "ldm").glob("*.yaml"))
    assert autoencoders and ldms, "no configs found"
    for path in autoencoders:
        cfg = load_config(path, AutoencoderRunConfig)
        assert cfg.data.resolution % cfg.model.downsample_factor == 0
    for path in ldms:
        cfg = resolve_paths(load_config(path, LDMRunConfig), path)
        if cfg.autoencoder.startswith("runs/"):  # a walk-through's own stage one (configs/ldm/demo.yaml)
            continue
        ae = load_config(Path(cfg.autoencoder) / "config.yaml", AutoencoderRunConfig)
        latent_channels = cfg.unet.in_channels - cfg.unet.concat_channels  # spatial conditions ride on top
        assert ae.model.latent_scale is not None and latent_channels == ae.model.embed_dim


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'model.ch_mul'.*did you mean 'ch_mult'"):
        from_dict(AutoencoderRunConfig, {"model": {"ch_mul": [1, 2]}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"training.batch_size = 'big': expected an integer"):
        from_dict(AutoencoderRunConfig, {"training": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"training.precision = 'fp8': expected one of"):
        from_dict(AutoencoderRunConfig, {"training": {"precision": "fp8"}})


def test_groupnorm_mismatch_is_an_error():
    with pytest.raises(ConfigError, match=r"model.ch \* ch_mult = 48: expected a multiple of norm_groups=32"):
        AutoencoderConfig(ch=48, ch_mult=(1, 2))


def test_resolution_not_divisible_by_f():
    with pytest.raises(ConfigError, match=r"data.resolution = 60: expected divisible by .* f=8"):
        from_dict(AutoencoderRunConfig, {"model": {"ch": 32, "ch_mult": [1, 1, 1, 1], "resolution": 64},
                                         "data": {"resolution": 60}})


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = from_dict(AutoencoderRunConfig, {"model": {"ch": 32, "ch_mult": [1, 2], "resolution": 32},
                                           "data": {"resolution": 32}})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    changed = load_config(tmp_path / "c.yaml", overrides=["training.max_steps=7", "loss.kl_weight=1e-5"])
    assert changed.training.max_steps == 7 and changed.loss.kl_weight == 1e-5
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(tmp_path / "c.yaml", overrides=["training.max_steps"])


def test_perceptual_weight_needs_weight_files():
    with pytest.raises(ConfigError, match="lpips_vgg_weights"):
        from_dict(AutoencoderRunConfig, {"loss": {"perceptual_weight": 1.0}})


def test_relative_paths_are_beside_the_config_file_else_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ae").mkdir()
    (tmp_path / "runs" / "stage1").mkdir(parents=True)
    config = tmp_path / "configs" / "ldm.yaml"
    save_config(LDMRunConfig(autoencoder="ae", training=TrainConfig(init_from="runs/stage1")), config)
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(load_config(config, LDMRunConfig), config)
    assert cfg.autoencoder == str(tmp_path / "configs" / "ae")  # beside the config
    assert cfg.training.init_from == str(tmp_path / "runs" / "stage1")  # where the user ran stage one
    missing = resolve_paths(load_config(config, LDMRunConfig, ["autoencoder=nowhere"]), config)
    assert missing.autoencoder == "nowhere"  # found nowhere: left as written, for the error to name
