"""What training runs report: log.jsonl from the first step, the same figures in TensorBoard with the grids, a
start-up summary and a time estimate."""

import json
import logging

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from latent_diffusion.training.autoencoder import train_autoencoder
from latent_diffusion.training.ldm import train_ldm
from latent_diffusion.training.run_log import RunLog, TimeEstimate

from conftest import tiny_ldm_config, tiny_run_config


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _events(run):
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events


def _scalars_match_the_log(run):
    """Every number of every log.jsonl line is the TensorBoard scalar train/<key> at its step, and nothing else."""
    lines, events = _log(run), _events(run)
    expected = {f"train/{key}": {} for line in lines for key in line if key != "step"}
    for line in lines:
        for key, value in line.items():
            if key != "step":
                expected[f"train/{key}"][line["step"]] = value
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag


def test_autoencoder_logs_its_first_step(tmp_path, shapes_folder):
    train_autoencoder(tiny_run_config(max_steps=6, log_every=5), shapes_folder, tmp_path, device="cpu",
                      progress=False)
    assert [line["step"] for line in _log(tmp_path)] == [1, 5, 6]


def test_autoencoder_tensorboard_holds_the_log_and_the_reconstruction_grids(tmp_path, shapes_folder):
    train_autoencoder(tiny_run_config(max_steps=4, log_every=3, image_every=2), shapes_folder, tmp_path,
                      device="cpu", progress=False)
    _scalars_match_the_log(tmp_path)
    assert {"train/loss", "train/kl", "train/lr", "train/images_per_s", "train/d_loss"} <= set(
        _events(tmp_path).Tags()["scalars"])
    grids = _events(tmp_path).Images("reconstructions")
    assert [g.step for g in grids] == [2, 4]
    assert (grids[-1].width, grids[-1].height) == Image.open(tmp_path / "samples" / "recon_0000004.png").size


def test_ldm_logs_its_first_step_and_tensorboard_holds_the_log_and_the_sample_grid(tmp_path, shapes_folder,
                                                                                    autoencoder_run):
    train_ldm(tiny_ldm_config(autoencoder_run, max_steps=6, log_every=5, image_every=6, checkpoint_every=6),
              shapes_folder, tmp_path, device="cpu", progress=False)
    assert [line["step"] for line in _log(tmp_path)] == [1, 5, 6]
    _scalars_match_the_log(tmp_path)
    assert [g.step for g in _events(tmp_path).Images("samples")] == [6]


def test_resuming_drops_what_was_logged_after_the_checkpoint(tmp_path):
    with_crash = RunLog(tmp_path)
    for step in (1, 2, 3):
        with_crash.write({"step": step, "loss": float(step)})
    with_crash.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by the crash
    resumed = RunLog(tmp_path, step=2)  # the last checkpoint was at step 2; step 3 is done again
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    assert [(line["step"], line["loss"]) for line in _log(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_only_rank_0_writes(tmp_path):
    log = RunLog(tmp_path, enabled=False)
    log.write({"step": 1, "loss": 1.0})
    log.add_image("samples", Image.new("RGB", (4, 4)), 1)
    log.close()
    assert not any(tmp_path.iterdir())


def test_start_up_summary_gives_data_parameters_and_epochs(tmp_path, shapes_folder, autoencoder_run, caplog):
    with caplog.at_level(logging.INFO, logger="latent_diffusion.training.run_log"):
        train_ldm(tiny_ldm_config(autoencoder_run, max_steps=6, batch_size=8), shapes_folder, tmp_path,
                  device="cpu", progress=False)
    text = caplog.text
    assert "data: 24 images (24 with a caption)" in text
    assert "parameters: " in text and " trained, " in text and " frozen" in text
    assert "batch 8 × max_steps 6 = 48 images = 2.0 epochs" in text


def test_time_estimate_is_logged_once_after_a_few_timed_steps(caplog):
    estimate = TimeEstimate(start=10, max_steps=100, after=2)
    with caplog.at_level(logging.INFO, logger="latent_diffusion.training.run_log"):
        for step in range(11, 20):
            estimate.step(step)
    assert [r.getMessage().split(" (")[0].split(" for ")[1] for r in caplog.records] == [
        "the 87 steps left to max_steps"]
