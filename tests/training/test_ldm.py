"""The LDM trainer on a tiny model: the loss falls and the run folder is a model, a resume continues the step count, the
text cache changes nothing."""

import json
from dataclasses import replace

import pytest

from latent_diffusion.training.ldm import train_ldm

from conftest import tiny_ldm_config


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_tiny_ldm_loss_falls_and_run_folder_is_a_model(ldm_run):
    losses = _losses(ldm_run)
    assert len(losses) == 9 and losses[-1] < 0.7 * losses[0]  # steps 1, 5, 10, ... 40
    for name in ("config.yaml", "unet.safetensors", "autoencoder/autoencoder.safetensors", "cache/latents.safetensors",
                 "checkpoints/last.safetensors", "samples/samples_0000040.png"):
        assert (ldm_run / name).is_file(), name


def test_resume_continues_the_step_count(tmp_path, shapes_folder, autoencoder_run):
    cfg = tiny_ldm_config(autoencoder_run, max_steps=10, log_every=5, checkpoint_every=5)
    train_ldm(cfg, shapes_folder, tmp_path, device="cpu", progress=False)
    train_ldm(replace(cfg, training=replace(cfg.training, max_steps=15)), shapes_folder, tmp_path, device="cpu",
              progress=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 5, 10, 15]


def test_text_cache_gives_the_same_training(tmp_path, shapes_folder, autoencoder_run):
    cfg = tiny_ldm_config(autoencoder_run, max_steps=5, log_every=5)
    train_ldm(cfg, shapes_folder, tmp_path / "plain", device="cpu", progress=False)
    cached = replace(cfg, conditioning=replace(cfg.conditioning, cache=True))
    train_ldm(cached, shapes_folder, tmp_path / "cached", device="cpu", progress=False)
    assert any((tmp_path / "cached" / "cache" / "text").rglob("*.safetensors"))
    assert _losses(tmp_path / "cached") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-4)
