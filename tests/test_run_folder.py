"""A run folder is never lost or shared: torn checkpoints keep the good one, one process at a time, no temporary files
left behind, and a stop during start-up (latent caching included) keeps what was done."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from latent_diffusion.cli import main
from latent_diffusion.config import SamplingConfig, save_config
from latent_diffusion.files import atomic
from latent_diffusion.files.weights import is_complete_safetensors, load_weights
from latent_diffusion.training.state import load_training_state, previous_path, save_training_state
from latent_diffusion.files.lock import RunFolderBusy, run_folder_lock
from latent_diffusion.training.autoencoder import train_autoencoder
from latent_diffusion.training.faults import StopRequested
from latent_diffusion.training.latent_cache import encode_dataset, partial_path
from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.data import ImageFolder

from conftest import tiny_autoencoder_config, tiny_ldm_config, tiny_run_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _state_step(path):
    return load_training_state(path, {}, {}, restore_rng=False)["step"]


def test_a_save_after_a_torn_last_checkpoint_keeps_the_readable_previous_one(tmp_path, monkeypatch):
    last, model = tmp_path / "last.safetensors", torch.nn.Linear(3, 3)
    save_training_state(last, {"m": model}, {}, step=1)
    save_training_state(last, {"m": model}, {}, step=2)
    assert _state_step(previous_path(last)) == 1
    last.write_bytes(last.read_bytes()[:200])  # torn: the run resumes from previous (step 1)
    assert not is_complete_safetensors(last) and is_complete_safetensors(previous_path(last))
    real_replace = os.replace

    def crash_before_the_new_last(src, dst):  # a crash between keeping the old file and renaming the new one
        if str(dst) == str(last):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_before_the_new_last)
    with pytest.raises(OSError, match="killed"):
        save_training_state(last, {"m": model}, {}, step=3)
    assert _state_step(previous_path(last)) == 1  # the torn file never replaced the good one
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    save_training_state(last, {"m": model}, {}, step=3)
    assert _state_step(last) == 3 and _state_step(previous_path(last)) == 1
    save_training_state(last, {"m": model}, {}, step=4)  # a whole last is kept as previous, as before
    assert _state_step(previous_path(last)) == 3


def _hold_lock(folder):
    """A second process that holds `folder`'s lock until killed."""
    code = ("import sys, time; from latent_diffusion.files.lock import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path, shapes_folder, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        in_flight = run / ".autoencoder.safetensors.abc123.tmp"  # the holder's write in progress
        in_flight.write_bytes(b"partial")
        config = tmp_path / "ae.yaml"
        save_config(tiny_run_config(max_steps=2), config)
        assert main(["train-autoencoder", "--config", str(config), "--data", str(shapes_folder), "--out", str(run),
                     "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {holder.pid} on" in err and len(err.strip().splitlines()) == 1
        assert in_flight.is_file() and not (run / "config.yaml").exists()  # nothing touched
        with pytest.raises(RunFolderBusy):
            with run_folder_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(run):  # a lock left by kill -9 is no lock: the kernel released it
        assert not in_flight.exists()  # and the dead holder's temporary file is cleaned up


def test_temporary_files_of_interrupted_writes_are_removed_everywhere_in_the_run(tmp_path, shapes_folder):
    run = tmp_path / "run"
    train_autoencoder(tiny_run_config(max_steps=2), shapes_folder, run, device="cpu", progress=False)
    torn = [run / ".autoencoder.safetensors.x1.tmp", run / ".config.yaml.x2.tmp",
            run / "samples" / ".recon_0000002.png.x3.tmp", run / "checkpoints" / ".previous.safetensors.link.tmp"]
    for path in torn:
        path.write_bytes(b"\0" * 1000)
    kept = run / ".notes.txt"  # a user's hidden file is not ours to delete
    kept.write_text("mine")
    train_autoencoder(tiny_run_config(max_steps=3), shapes_folder, run, device="cpu", progress=False)
    assert not any(path.exists() for path in torn) and kept.read_text() == "mine"
    assert not list(run.rglob("*.tmp"))


def test_input_refused_at_start_up_leaves_no_run_folder(tmp_path, capsys):
    config = tmp_path / "ae.yaml"
    save_config(tiny_run_config(max_steps=2), config)
    assert main(["train-autoencoder", "--config", str(config), "--data", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert not (tmp_path / "run").exists()


class _StopAfter:
    """A stand-in for `StopSignals` whose stop arrives once `count` batches have been encoded."""

    def __init__(self, count):
        self.count, self.requested = count, None

    def check(self, step=0):
        if self.requested is not None:
            raise StopRequested(self.requested, step)

    def tick(self, *args):
        self.count -= 1
        if self.count == 0:
            self.requested = "SIGTERM"


def test_a_stop_while_caching_latents_keeps_the_encoded_part_and_the_next_run_continues(tmp_path, shapes_folder):
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(tiny_autoencoder_config()).eval()
    dataset = ImageFolder(shapes_folder, 16)
    whole = encode_dataset(autoencoder, dataset, tmp_path / "whole", batch_size=5, progress=False)
    stop = _StopAfter(2)
    hook = autoencoder.encoder.register_forward_hook(stop.tick)
    with pytest.raises(StopRequested):
        encode_dataset(autoencoder, dataset, tmp_path / "cache", batch_size=5, progress=False, signals=stop)
    hook.remove()
    partial = partial_path(tmp_path / "cache" / "latents.safetensors")
    assert load_weights(partial)["mean"].shape[0] == 10  # the two batches done are kept
    calls = []
    hook = autoencoder.encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    resumed = encode_dataset(autoencoder, dataset, tmp_path / "cache", batch_size=5, progress=False)
    hook.remove()
    assert sum(calls) == len(dataset) - 10 and not partial.exists()  # only the rest was encoded
    assert torch.allclose(resumed.mean, whole.mean, atol=1e-6) and resumed.captions == whole.captions


def test_sigterm_during_start_up_is_a_clean_stop(tmp_path, shapes_folder, autoencoder_run):
    config = tmp_path / "ldm.yaml"
    save_config(replace(tiny_ldm_config(autoencoder_run, max_steps=4), sampling=SamplingConfig()), config)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "train", "--config", str(config),
                                "--data", str(shapes_folder), "--out", str(run), "--device", "cpu"],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
