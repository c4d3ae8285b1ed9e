"""FID and KID against closed forms, the domain feature network and generative evaluation (plots: test_plot.py)."""

import gzip
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.config import ConditioningConfig, SamplingConfig
from latent_diffusion.data.shapes import write_shapes_folder
from latent_diffusion.evaluation.features import (FeatureNet, FeatureNetConfig, extract, load_feature_net,
                                                  save_feature_net, train_feature_net)
from latent_diffusion.evaluation.fid import fid, frechet_distance, kid
from latent_diffusion.training.ldm import train_ldm

from conftest import tiny_ldm_config
from test_inception import random_inception_file


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # Diagonal covariances: ‖μ₁−μ₂‖² + Σ (√a − √b)².
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    expected = 5.0 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_fid_and_kid_are_near_zero_for_one_distribution_and_grow_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 8, generator=gen), torch.randn(4000, 8, generator=gen)
    assert fid(x, y) < 0.05 and abs(kid(x, y, subsets=20, subset_size=500)[0]) < 0.01
    shifted = y + torch.tensor([1.0] + [0.0] * 7)
    assert fid(x, shifted) == pytest.approx(1.0, abs=0.1)
    assert kid(x, shifted, subsets=20, subset_size=500)[0] > 0.05


class _Labelled(torch.utils.data.Dataset):
    """Two classes a feature net can tell apart: bright squares top-left vs bottom-right."""

    def __init__(self, n=64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = -torch.ones(1, 32, 32)
        label = i % 2
        if label == 0:
            image[:, 4:14, 4:14] = 1.0
        else:
            image[:, 18:28, 18:28] = 1.0
        return {"image": image + 0.05 * torch.randn(1, 32, 32), "label": label}


def test_feature_net_learns_classes_and_round_trips_through_its_folder(tmp_path):
    cfg = FeatureNetConfig(num_classes=2, width=8, feature_dim=16)
    model = train_feature_net(_Labelled(), cfg, epochs=3, batch_size=16, progress=False)
    images = torch.stack([_Labelled()[i]["image"] for i in range(16)])
    features, predicted = extract(model, images)
    assert features.shape == (16, 16) and (predicted == torch.arange(16) % 2).float().mean() >= 0.9
    save_feature_net(model, tmp_path / "features", {"test_accuracy": 1.0})
    again = load_feature_net(tmp_path / "features")
    assert torch.equal(extract(again, images)[0], features)
    assert json.loads((tmp_path / "features" / "features.json").read_text())["test_accuracy"] == 1.0


def test_eval_autoencoder_reports_rfid_with_a_feature_network(tmp_path, autoencoder_run, capsys):
    net = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=2, width=8, feature_dim=8)).eval()
    save_feature_net(net, tmp_path / "features")
    held_out = write_shapes_folder(tmp_path / "held-out", 8, seed=5, progress=False)
    assert main(["eval-autoencoder", str(autoencoder_run), "--data", str(held_out), "--out", str(tmp_path / "eval"),
                 "--features", str(tmp_path / "features")]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["rfid"] >= 0 and figures["num_images"] == 8
    grid = Image.open(tmp_path / "eval" / "eval.png")  # 8 held-out images above their reconstructions
    assert grid.size[0] > 2 * grid.size[1]


def _write_idx(path, array, dims):
    header = (0x0800 | dims).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def test_eval_fid_measures_a_class_conditional_model_per_guidance(tmp_path, autoencoder_run, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    data = tmp_path / "fashion"
    data.mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + (labels[:, None, None] * 20)  # brightness tells the class
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", images, 3)
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels, 1)
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
        assert f["fid"] >= 0 and 0 <= f["class_accuracy"] <= 1 and f["diversity"] > 0
    assert (out / "fid.png").is_file() and (out / "accuracy.png").is_file()
    assert "dpmpp_2m 2 steps w=3.0: FID" in capsys.readouterr().out

    random_inception_file(tmp_path / "inception.pth")  # the standard FID on top, from a weights file
    assert main(["eval-fid", str(run), "--data", str(data), "--features", str(tmp_path / "f"), "--num", "10",
                 "--guidance", "3", "--steps", "2", "--device", "cpu", "--inception", str(tmp_path / "inception.pth"),
                 "--out", str(tmp_path / "with-inception")]) == 0
    figures = json.loads((tmp_path / "with-inception" / "fid.json").read_text())
    assert figures["results"][0]["inception_fid"] > 0 and "inception_fid" in figures
    assert (tmp_path / "with-inception" / "inception_fid.png").is_file()
