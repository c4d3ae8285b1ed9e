"""`ldm train-autoencoder` / `eval-autoencoder` end to end on tiny configs: outputs, resume, errors."""

import json
from dataclasses import replace

import pytest
import torch

from latent_diffusion.cli import main
from latent_diffusion.config import ConfigError, load_config, save_config
from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run
from latent_diffusion.formats.autoencoder import load_autoencoder
from latent_diffusion.files.weights import load_weights
from latent_diffusion.training.autoencoder import train_autoencoder

from conftest import tiny_run_config


def _log_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_writes_checkpoints_logs_and_grids(tmp_path, shapes_folder):
    run = tmp_path / "run"
    last = train_autoencoder(tiny_run_config(max_steps=4), shapes_folder, run, device="cpu", progress=False)
    assert last["step"] == 4 and "d_loss" in last  # the discriminator starts at step 2
    assert _log_steps(run) == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["recon_0000002.png", "recon_0000004.png"]
    model, cfg = load_autoencoder(run)
    assert cfg == load_config(run / "config.yaml")
    assert set(load_weights(run / "autoencoder.safetensors")) == set(model.state_dict())


def test_resume_continues_the_same_trajectory(tmp_path, shapes_folder):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_autoencoder(tiny_run_config(max_steps=6), shapes_folder, straight, device="cpu", progress=False)
    train_autoencoder(tiny_run_config(max_steps=4), shapes_folder, resumed, device="cpu", progress=False)
    train_autoencoder(tiny_run_config(max_steps=6), shapes_folder, resumed, device="cpu", progress=False)
    assert _log_steps(resumed) == [1, 2, 3, 4, 5, 6]
    a, b = load_weights(straight / "autoencoder.safetensors"), load_weights(resumed / "autoencoder.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert json.loads((resumed / "log.jsonl").read_text().splitlines()[-1])["loss"] == pytest.approx(
        json.loads((straight / "log.jsonl").read_text().splitlines()[-1])["loss"], rel=1e-5)


def test_resume_with_another_model_is_refused(tmp_path, shapes_folder):
    run = tmp_path / "run"
    cfg = tiny_run_config(max_steps=2)
    train_autoencoder(cfg, shapes_folder, run, device="cpu", progress=False)
    other = replace(cfg, model=replace(cfg.model, z_channels=3, embed_dim=3))
    with pytest.raises(ConfigError, match="different 'model' section"):
        train_autoencoder(other, shapes_folder, run, device="cpu", progress=False)


def test_eval_measures_without_changing_the_run_and_writes_the_scale_only_when_asked(tmp_path, shapes_folder):
    run, out = tmp_path / "run", tmp_path / "eval"
    train_autoencoder(tiny_run_config(max_steps=2), shapes_folder, run, device="cpu", progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    figures = evaluate_autoencoder_run(run, shapes_folder, out, device="cpu", progress=False)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert figures["latent_shape"] == [4, 16, 16]
    assert figures["latent_scale"] == pytest.approx(1 / figures["latent_std"])
    assert json.loads((out / "eval.json").read_text())["psnr"] == pytest.approx(figures["psnr"])
    assert (out / "eval.png").is_file()
    assert load_config(run / "config.yaml").model.latent_scale is None
    evaluate_autoencoder_run(run, shapes_folder, out, device="cpu", write_scale=True, progress=False)
    assert load_config(run / "config.yaml").model.latent_scale == pytest.approx(figures["latent_scale"])
    train_autoencoder(tiny_run_config(max_steps=3), shapes_folder, run, device="cpu", progress=False)  # still resumable


def _write_config(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    return str(path)


def test_cli_bad_input_is_a_clear_error_before_training(tmp_path, shapes_folder, capsys):
    cfg_path = _write_config(tmp_path, tiny_run_config())
    out = str(tmp_path / "run")
    assert main(["train-autoencoder", "--config", cfg_path, "--data", str(tmp_path / "nope"), "--out", out]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["train-autoencoder", "--config", cfg_path, "--data", str(shapes_folder), "--out", out,
                 "--set", "model.in_channels=2"]) == 2
    assert "model.in_channels = 2" in capsys.readouterr().err
    assert main(["train-autoencoder", "--config", cfg_path, "--data", str(shapes_folder), "--out", out,
                 "--set", "data.resolution=63"]) == 2
    assert "data.resolution = 63" in capsys.readouterr().err
    assert main(["train-autoencoder", "--config", cfg_path, "--data", str(shapes_folder), "--out", out,
                 "--set", "training.precision=fp16", "--device", "cpu"]) == 2
    assert "fp16 is unusably slow on a CPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_trains_and_evaluates(tmp_path, shapes_folder, capsys):
    cfg_path = _write_config(tmp_path, tiny_run_config())
    run = tmp_path / "run"
    assert main(["train-autoencoder", "--config", cfg_path, "--data", str(shapes_folder), "--out", str(run),
                 "--set", "training.max_steps=2", "--device", "cpu"]) == 0
    assert main(["eval-autoencoder", str(run), "--data", str(shapes_folder), "--device", "cpu"]) == 0
    assert "PSNR" in capsys.readouterr().out
