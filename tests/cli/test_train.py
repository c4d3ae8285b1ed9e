"""`ldm train-autoencoder` and `ldm eval-autoencoder` from the command line: bad input refused before any work (no run
folder left), a run trained and evaluated."""

from latent_diffusion.cli import main
from latent_diffusion.config import save_config

from conftest import tiny_run_config


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


def test_input_refused_at_start_up_leaves_no_run_folder(tmp_path, capsys):
    config = tmp_path / "ae.yaml"
    save_config(tiny_run_config(max_steps=2), config)
    assert main(["train-autoencoder", "--config", str(config), "--data", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert not (tmp_path / "run").exists()
