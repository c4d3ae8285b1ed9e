"""Generative evaluation (`ldm eval-fid`): FID, class accuracy and diversity per guidance scale, the standard Inception
FID on top, written outside the model folder."""

import json
from dataclasses import replace

import numpy as np

from latent_diffusion.cli import main
from latent_diffusion.config import ConditioningConfig, SamplingConfig
from latent_diffusion.evaluation.features import FeatureNet, FeatureNetConfig, save_feature_net
from latent_diffusion.training.ldm import train_ldm

from conftest import random_inception_file, tiny_ldm_config, write_idx


def test_eval_fid_measures_a_class_conditional_model_per_guidance(tmp_path, autoencoder_run, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    data = tmp_path / "fashion"
    data.mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + (labels[:, None, None] * 20)  # brightness tells the class
        write_idx(data / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    cfg = tiny_ldm_config(autoencoder_run, max_steps=2, checkpoint_every=2)
    cfg = replace(cfg, conditioning=ConditioningConfig(encoder="class", num_classes=10), sampling=SamplingConfig())
    run = tmp_path / "run"
    train_ldm(cfg, data, run, device="cpu", progress=False)
    save_feature_net(FeatureNet(FeatureNetConfig(in_channels=3, width=8, feature_dim=8)).eval(), tmp_path / "f")
    model_files = sorted(p.relative_to(run) for p in run.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval-fid", str(run), "--data", str(data), "--features", str(tmp_path / "f"), "--num", "20",
                 "--guidance", "1", "3", "--steps", "2", "--device", "cpu"]) == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == model_files  # measuring writes elsewhere
    out = tmp_path / "runs" / "eval-fid" / run.name
    figures = json.loads((out / "fid.json").read_text())
    assert figures["reference_images"] == 20 and [f["guidance"] for f in figures["results"]] == [1.0, 3.0]
    for f in figures["results"]:
        assert f["fid"] > 0 and 0 <= f["class_accuracy"] <= 1 and f["diversity"] > 0
    assert (out / "fid.png").is_file() and (out / "accuracy.png").is_file()
    assert "dpmpp_2m 2 steps w=3.0: FID" in capsys.readouterr().out

    random_inception_file(tmp_path / "inception.pth")  # the standard FID on top, from a weights file
    assert main(["eval-fid", str(run), "--data", str(data), "--features", str(tmp_path / "f"), "--num", "10",
                 "--guidance", "3", "--steps", "2", "--device", "cpu", "--inception", str(tmp_path / "inception.pth"),
                 "--out", str(tmp_path / "with-inception")]) == 0
    figures = json.loads((tmp_path / "with-inception" / "fid.json").read_text())
    assert figures["results"][0]["inception_fid"] > 0 and "inception_fid" in figures
    assert (tmp_path / "with-inception" / "inception_fid.png").is_file()
