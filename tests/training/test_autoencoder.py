"""The autoencoder trainer: checkpoints, logs and grids, a resume on the same trajectory (another model refused), and
every training setting followed (max_minutes, weight_decay, ema_decay, init_from) or refused before any work."""

import json
from dataclasses import replace

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL, pixel_space_config
from latent_diffusion.config import ConfigError, load_config
from latent_diffusion.files.weights import load_weights
from latent_diffusion.formats.autoencoder import load_autoencoder
from latent_diffusion.training import loop
from latent_diffusion.training.autoencoder import train_autoencoder
from latent_diffusion.training.state import load_training_state

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


def _train(run, shapes_folder, **training):
    return train_autoencoder(tiny_run_config(**training), shapes_folder, run, device="cpu", progress=False)


def test_max_minutes_stops_with_a_checkpoint_and_the_run_resumes_from_it(tmp_path, shapes_folder, monkeypatch):
    clock = iter(range(0, 10 ** 6, 60))  # a minute passes between two readings
    monkeypatch.setattr(loop, "monotonic", lambda: next(clock))
    last = _train(tmp_path, shapes_folder, max_steps=3, max_minutes=2.5)
    assert last["step"] == 2 and last["stopped"] == "max_minutes"
    assert load_training_state(tmp_path / "checkpoints" / "last.safetensors", {}, {}, restore_rng=False)["step"] == 2
    monkeypatch.undo()
    assert _train(tmp_path, shapes_folder, max_steps=3)["step"] == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_weight_decay_shrinks_the_autoencoder_weights_decoupled_from_adam(tmp_path, shapes_folder):
    lr, decay = 1e-3, 0.5
    _train(tmp_path / "plain", shapes_folder, max_steps=1, learning_rate=lr)
    _train(tmp_path / "decayed", shapes_folder, max_steps=1, learning_rate=lr, weight_decay=decay)
    torch.manual_seed(0)  # training.seed: the weights before the step
    initial = AutoencoderKL(tiny_run_config().model).state_dict()
    plain, decayed = (load_weights(tmp_path / run / "autoencoder.safetensors") for run in ("plain", "decayed"))
    for name, weight in initial.items():  # AdamW: θ ← θ − lr·λ·θ − lr·Adam(∇)
        assert torch.allclose(plain[name] - decayed[name], lr * decay * weight, atol=1e-6), name


def test_ema_decay_keeps_an_average_and_the_weights_file_holds_it(tmp_path, shapes_folder):
    _train(tmp_path, shapes_folder, max_steps=1, ema_decay=0.5)
    _train(tmp_path, shapes_folder, max_steps=2, ema_decay=0.5)  # resumes the average too
    state, weights = load_weights(tmp_path / "checkpoints" / "last.safetensors"), load_weights(
        tmp_path / "autoencoder.safetensors")
    names = [name for name, _ in AutoencoderKL(tiny_run_config().model).named_parameters()]
    assert int(state["ema.num_updates"]) == 2
    assert all(torch.equal(weights[name], state[f"ema.shadow_{i}"]) for i, name in enumerate(names))
    assert not all(torch.equal(weights[name], state[f"model.{name}"]) for name in names)


def test_init_from_starts_from_another_runs_weights(tmp_path, shapes_folder):
    _train(tmp_path / "first", shapes_folder, max_steps=2)
    _train(tmp_path / "second", shapes_folder, max_steps=1, learning_rate=0.0, init_from=str(tmp_path / "first"))
    first, second = (load_weights(tmp_path / run / "autoencoder.safetensors") for run in ("first", "second"))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_init_from_a_folder_without_a_matching_autoencoder_is_a_config_error(tmp_path, shapes_folder):
    with pytest.raises(ConfigError, match=r"training.init_from = '.*nowhere': expected an autoencoder run folder"):
        _train(tmp_path / "run", shapes_folder, init_from=str(tmp_path / "nowhere"))
    other = tiny_run_config(max_steps=1)
    other = replace(other, model=replace(other.model, ch=16))
    train_autoencoder(other, shapes_folder, tmp_path / "wider", device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"training.init_from = '.*wider'.*of the same model"):
        _train(tmp_path / "run", shapes_folder, init_from=str(tmp_path / "wider"))


def test_settings_the_autoencoder_cannot_follow_are_refused_before_any_work(tmp_path, shapes_folder):
    with pytest.raises(ConfigError, match="training.strategy = 'fsdp': the autoencoder trains with 'ddp'"):
        _train(tmp_path / "run", shapes_folder, strategy="fsdp")
    pixel = replace(tiny_run_config(), model=pixel_space_config(3, 32))
    with pytest.raises(ConfigError, match="model.pixel_space = true: pixel space is the identity"):
        train_autoencoder(pixel, shapes_folder, tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_vq_autoencoder_trains_logs_its_codes_and_is_the_first_stage_of_an_ldm(tmp_path, shapes_folder):
    from latent_diffusion.autoencoder import VQAutoencoder
    from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run
    from latent_diffusion.pipeline import Pipeline
    from latent_diffusion.training.ldm import train_ldm

    from conftest import tiny_ldm_config

    cfg = tiny_run_config(max_steps=4)
    cfg = replace(cfg, model=replace(cfg.model, z_channels=3, embed_dim=3, regularizer="vq", n_embed=32,
                                     vq_restart_after=2))
    run = tmp_path / "vq"
    last = train_autoencoder(cfg, shapes_folder, run, device="cpu", progress=False)
    assert {"vq", "perplexity", "codes_used"} <= set(last) and "kl" not in last
    assert last["vq"] > 0 and 1 <= last["perplexity"] <= 32 and 0 < last["codes_used"] <= 1
    model, stored = load_autoencoder(run)
    assert isinstance(model, VQAutoencoder) and stored.model.regularizer == "vq"
    evaluate_autoencoder_run(run, shapes_folder, run / "eval", device="cpu", write_scale=True, progress=False)
    ldm = tmp_path / "ldm"
    ldm_cfg = tiny_ldm_config(run, max_steps=2, checkpoint_every=2)
    ldm_cfg = replace(ldm_cfg, unet=replace(ldm_cfg.unet, in_channels=3, out_channels=3))
    train_ldm(ldm_cfg, shapes_folder, ldm, device="cpu", progress=False)
    pipe = Pipeline.from_pretrained(ldm, device="cpu")
    images = pipe.generate_tensors("a small red circle in the center", steps=2, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    with torch.no_grad():  # the pipeline's decoder (in bands) quantises as the plain one does
        z = torch.randn(1, 3, 8, 8)
        assert torch.allclose(pipe.autoencoder.decode(z), model.decode(z), atol=1e-5)
