"""A tiny latent diffusion model end to end: training on shapes, resume, generation, and input errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

from conftest import tiny_ldm_config


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, shapes_folder, autoencoder_run):
    run = tmp_path_factory.mktemp("ldm")
    train_ldm(tiny_ldm_config(autoencoder_run), shapes_folder, run, device="cpu", progress=False)
    return run


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


def test_generation_is_deterministic_for_a_seed(ldm_run):
    pipe = Pipeline.from_pretrained(ldm_run, device="cpu")
    kwargs = dict(steps=3, guidance_scale=3.0, sampler="dpmpp_2m", num_images=2, progress=False)
    a = pipe.generate_tensors("a large blue square on the left", seed=1, **kwargs)
    b = pipe.generate_tensors("a large blue square on the left", seed=1, **kwargs)
    c = pipe.generate_tensors("a large blue square on the left", seed=2, **kwargs)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    wide = pipe.generate_tensors("a small red circle", seed=1, steps=2, width=64, progress=False)
    assert wide.shape == (1, 3, 32, 64)


def test_bad_generation_requests_are_clear_errors(ldm_run, tmp_path):
    pipe = Pipeline.from_pretrained(ldm_run, device="cpu")
    with pytest.raises(ValueError, match="height = 30: expected a positive multiple of 4"):
        pipe.generate_tensors("x", height=30)
    with pytest.raises(ValueError, match="steps = 0"):
        pipe.generate_tensors("x", steps=0)
    with pytest.raises(ValueError, match="unknown sampler 'fast'; known samplers: ddim, ddpm, dpmpp_2m"):
        pipe.generate_tensors("x", sampler="fast")
    with pytest.raises(ValueError, match="guidance scale = -1"):
        pipe.generate_tensors("x", guidance_scale=-1.0)
    with pytest.raises(CheckpointError, match="is not a model folder"):
        Pipeline.from_pretrained(tmp_path, device="cpu")


def test_cli_generate_writes_an_image(ldm_run, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a small red circle in the center", "-o", str(out), "--model", str(ldm_run),
                 "--steps", "2", "--num-images", "2", "--device", "cpu"]) == 0
    assert out.is_file()
    assert main(["generate", "x", "--model", str(tmp_path), "--device", "cpu"]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    tiled = tmp_path / "tiled.png"  # 64×48 pixels: a 32×24 latent (f = 2), decoded in overlapping 8×8 tiles
    assert main(["generate", "a small red circle", "-o", str(tiled), "--model", str(ldm_run), "--steps", "2",
                 "--height", "64", "--width", "48", "--vae-tile", "8", "--device", "cpu"]) == 0
    assert Image.open(tiled).size == (48, 64)
    assert main(["generate", "x", "--model", str(ldm_run), "--vae-tile", "1", "--device", "cpu"]) == 2
    assert "--vae-tile = 1" in capsys.readouterr().err


def test_cli_eval_adherence_writes_figures(ldm_run, shapes_folder, tmp_path, capsys):
    out = tmp_path / "adh"
    assert main(["eval-adherence", str(ldm_run), "--data", str(shapes_folder), "--num", "10", "--guidance", "1",
                 "3", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    figures = json.loads((out / "adherence.json").read_text())
    assert [(f["sampler"], f["steps"], f["guidance"]) for f in figures["results"]] == [("dpmpp_2m", 2, 1.0),
                                                                                       ("dpmpp_2m", 2, 3.0)]
    assert 0.0 <= figures["results"][1]["all"] <= 1.0 and figures["results"][0]["objects"] >= 10
    assert (out / "samples_w3.0.png").is_file() and (out / "adherence.png").is_file()
    assert "dpmpp_2m 2 steps w=3.0: all attributes" in capsys.readouterr().out


def test_cli_eval_adherence_sweeps_samplers_and_steps(ldm_run, shapes_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["eval-adherence", str(ldm_run), "--data", str(shapes_folder), "--num", "4", "--guidance", "2",
                 "--steps", "1", "2", "--sampler", "ddim", "euler", "--out", str(out), "--device", "cpu"]) == 0
    figures = json.loads((out / "adherence.json").read_text())
    assert [(f["sampler"], f["steps"]) for f in figures["results"]] == [("ddim", 1), ("ddim", 2), ("euler", 1),
                                                                         ("euler", 2)]
    assert (out / "samples_euler_2_w2.0.png").is_file() and (out / "adherence.png").is_file()
    assert main(["eval-adherence", str(ldm_run), "--data", str(shapes_folder), "--sampler", "ddim", "nope",
                 "--device", "cpu"]) == 2
    assert "unknown sampler(s) ['nope']" in capsys.readouterr().err


def test_class_prompts_name_the_class_or_give_its_number():
    from latent_diffusion.config import ConditioningConfig, ConfigError, LDMRunConfig, load_config
    from latent_diffusion.conditioning.conditioner import class_label

    cfg = load_config(Path(__file__).parent.parent / "configs/ldm/fashion.yaml", LDMRunConfig).conditioning
    assert [class_label(p, cfg) for p in ("a photo of a sneaker", "a photo of a t-shirt", "Shirt", "3",
                                          "an ankle boot")] == [7, 0, 6, 3, 9]
    with pytest.raises(ValueError, match=r"a class name \(t-shirt, .*\) or a label number 0 to 9, got 'a cat'"):
        class_label("a cat", cfg)
    with pytest.raises(ValueError, match="a label number 0 to 2, got 'x'"):
        class_label("x", ConditioningConfig(encoder="class", num_classes=3))
    with pytest.raises(ConfigError, match="conditioning.class_names"):
        ConditioningConfig(encoder="class", num_classes=3, class_names=("a", "b"))
