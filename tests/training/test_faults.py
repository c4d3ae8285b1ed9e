"""Training survives faults: SIGTERM (during start-up too), kill -9 at random moments, torn checkpoints, NaN losses."""

import json
import logging
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import latent_diffusion.training.ldm as ldm_training
from latent_diffusion.cli import main
from latent_diffusion.config import SamplingConfig, save_config
from latent_diffusion.files import weights as checkpoint
from latent_diffusion.files.weights import load_weights, read_metadata
from latent_diffusion.training.ldm import train_ldm
from latent_diffusion.training.state import load_training_state

from conftest import subprocess_env, tiny_ldm_config


def _config(autoencoder_run, **training):
    base = dict(max_steps=4, batch_size=4, checkpoint_every=2, log_every=1)
    base.update(training)
    return replace(tiny_ldm_config(autoencoder_run, **base), sampling=SamplingConfig())


def _logged_steps(run):
    if not (run / "log.jsonl").is_file():
        return []
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def _start(tmp_path, autoencoder_run, shapes_folder, run, **training):
    config = tmp_path / "config.yaml"
    save_config(_config(autoencoder_run, **training), config)
    return subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "train", "--config", str(config),
                             "--data", str(shapes_folder), "--out", str(run), "--device", "cpu"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(process, run, count, timeout=120):
    deadline = time.time() + timeout
    while len(_logged_steps(run)) < count:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.05)


def _assert_checkpoints_readable(run):
    for path in (run / "checkpoints").glob("*.safetensors"):
        load_weights(path)  # raises CheckpointError on a torn file
        assert "training_state" in read_metadata(path)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, shapes_folder, autoencoder_run):
    run = tmp_path / "run"
    process = _start(tmp_path, autoencoder_run, shapes_folder, run, max_steps=100000, checkpoint_every=100000)
    _wait_for_steps(process, run, 3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped"] == "SIGTERM"
    step = load_training_state(run / "checkpoints" / "last.safetensors", {}, {}, restore_rng=False)["step"]
    assert step == result["step"] >= 3 and step >= _logged_steps(run)[-1]


def test_kill_9_at_random_moments_never_loses_more_than_a_checkpoint(tmp_path, shapes_folder, autoencoder_run):
    run, rng = tmp_path / "run", random.Random(0)
    for _ in range(4):
        process = _start(tmp_path, autoencoder_run, shapes_folder, run, max_steps=40, checkpoint_every=1)
        _wait_for_steps(process, run, len(_logged_steps(run)) + 1)
        time.sleep(rng.uniform(0.0, 0.5))  # every step saves: kills land in saves as well as in steps
        process.kill()
        process.wait()
        _assert_checkpoints_readable(run)
    before = _logged_steps(run)
    process = _start(tmp_path, autoencoder_run, shapes_folder, run, max_steps=40, checkpoint_every=1)
    assert process.wait(timeout=300) == 0, process.communicate()[1][-2000:]
    _assert_checkpoints_readable(run)
    steps = _logged_steps(run)
    assert steps[-1] == 40 and set(steps) == set(range(1, 41))
    resumed_at = steps[len(before)] - 1  # the first step logged by the final run, minus one
    assert resumed_at >= before[-1] - 1  # at most the step in flight at the kill was lost
    assert not list((run / "checkpoints").glob(".*.tmp"))  # torn temporary files were cleaned up


def test_a_crash_during_a_save_keeps_the_last_good_checkpoint(tmp_path, shapes_folder, autoencoder_run,
                                                              monkeypatch):
    run = tmp_path / "run"
    train_ldm(_config(autoencoder_run), shapes_folder, run, device="cpu", progress=False)

    def torn_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", torn_save)
    with pytest.raises(OSError, match="disk full"):
        train_ldm(_config(autoencoder_run, max_steps=6), shapes_folder, run, device="cpu", progress=False)
    _assert_checkpoints_readable(run)
    assert load_training_state(run / "checkpoints" / "last.safetensors", {}, {}, restore_rng=False)["step"] == 4


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path, shapes_folder, autoencoder_run, caplog):
    run = tmp_path / "run"
    train_ldm(_config(autoencoder_run), shapes_folder, run, device="cpu", progress=False)
    last = run / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        train_ldm(_config(autoencoder_run, max_steps=6), shapes_folder, run, device="cpu", progress=False)
    assert f"checkpoint {last} is unreadable" in caplog.text
    assert _logged_steps(run) == [1, 2, 3, 4, 5, 6]  # resumed from the previous checkpoint, step 2: 3, 4 redone


def test_nan_losses_skip_their_step_and_repeated_ones_stop_the_run(tmp_path, shapes_folder, autoencoder_run,
                                                                 monkeypatch):
    real, calls = ldm_training.diffusion_loss, {"n": 0, "bad": {2}}

    def flaky_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in calls["bad"] else loss

    monkeypatch.setattr(ldm_training, "diffusion_loss", flaky_loss)
    run = tmp_path / "run"
    last = train_ldm(_config(autoencoder_run), shapes_folder, run, device="cpu", progress=False)
    assert last["step"] == 4 and last["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in load_weights(run / "unet.safetensors").values())
    calls.update(n=0, bad=set(range(1, 100)))
    with pytest.raises(FloatingPointError, match="5 non-finite diffusion losses in a row, the last at step 8"):
        train_ldm(_config(autoencoder_run, max_steps=20), shapes_folder, run, device="cpu", progress=False)


def test_sigterm_during_start_up_is_a_clean_stop(tmp_path, shapes_folder, autoencoder_run):
    config = tmp_path / "ldm.yaml"
    save_config(replace(tiny_ldm_config(autoencoder_run, max_steps=4), sampling=SamplingConfig()), config)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "train", "--config", str(config),
                                "--data", str(shapes_folder), "--out", str(run), "--device", "cpu"],
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:  # start-up's summary comes before it caches latents
        seen.append(line)
        if "parameters:" in line:
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, "".join(seen) + stderr[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["stopped"] == "SIGTERM"
    assert "Traceback" not in stderr and not list(run.rglob("*.tmp"))
    start = time.time()
    assert main(["train", "--config", str(config), "--data", str(shapes_folder), "--out", str(run),
                 "--device", "cpu"]) == 0  # and the run goes on from there
    assert time.time() - start < 120 and json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 4
