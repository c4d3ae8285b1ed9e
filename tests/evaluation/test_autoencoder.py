"""Autoencoder evaluation: figures measured without changing the run, the latent scale written only when asked, rFID
with a feature network."""

import json

import pytest
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.config import load_config
from latent_diffusion.data.shapes import write_shapes_folder
from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run
from latent_diffusion.evaluation.features import FeatureNet, FeatureNetConfig, save_feature_net
from latent_diffusion.training.autoencoder import train_autoencoder

from conftest import tiny_run_config


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


def test_eval_autoencoder_reports_rfid_with_a_feature_network(tmp_path, autoencoder_run, capsys):
    net = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=2, width=8, feature_dim=8)).eval()
    save_feature_net(net, tmp_path / "features")
    held_out = write_shapes_folder(tmp_path / "held-out", 8, seed=5, progress=False)
    assert main(["eval-autoencoder", str(autoencoder_run), "--data", str(held_out), "--out", str(tmp_path / "eval"),
                 "--features", str(tmp_path / "features")]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["rfid"] > 0 and figures["num_images"] == 8  # reconstructions are not the images
    grid = Image.open(tmp_path / "eval" / "eval.png")  # 8 held-out images above their reconstructions
    assert grid.size[0] > 2 * grid.size[1]
