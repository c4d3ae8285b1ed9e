"""A run folder is one process's at a time: a second run is refused naming the holder, and a killed holder's lock and
temporary files are gone."""

import subprocess
import sys

import pytest

from latent_diffusion.cli import main
from latent_diffusion.config import save_config
from latent_diffusion.files.lock import RunFolderBusy, run_folder_lock

from conftest import subprocess_env, tiny_run_config


def _hold_lock(folder):
    """A second process that holds `folder`'s lock until killed."""
    code = ("import sys, time; from latent_diffusion.files.lock import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
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
