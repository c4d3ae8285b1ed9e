"""The experiment scripts' own pieces: the super-resolution baseline and scores, the ControlNet held-out scenes and
layout measurement."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from latent_diffusion.data.shapes import render_scene, generate_scene

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_superres_shrinks_by_block_averages_and_bicubic_restores_smooth_images():
    superres = load("superres")
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = (0.5 * x * y)[None, None].repeat(2, 1, 1, 1)
    low = superres.shrink(images)
    assert low.shape == (2, 1, 8, 8) and torch.allclose(low[0, 0, 0, 0], images[0, 0, :4, :4].mean())
    restored = superres.bicubic(low)
    assert restored.shape == images.shape and (restored - images).abs().mean() < 0.02


def test_superres_scores_of_the_originals_themselves():
    superres = load("superres")

    class Features(torch.nn.Module):  # a stand-in for the domain feature network: pooled pixels
        def features(self, x):
            return F.adaptive_avg_pool2d(x, 4).flatten(1)

        def head(self, f):
            return f[:, :10]

    images = torch.rand(64, 1, 32, 32) * 2 - 1
    features = Features()
    reference = features.features(images)
    same = superres.scores(images, images, features, reference)
    assert same["psnr"] > 100 and same["ssim"] == pytest.approx(1.0) and abs(same["fid"]) < 1e-3
    worse = superres.scores(superres.bicubic(superres.shrink(images)), images, features, reference)
    assert worse["psnr"] < 30 and worse["ssim"] < 0.9 and worse["fid"] > same["fid"]


def test_superres_psnr_and_ssim_are_scikit_images():
    """The scores' PSNR and SSIM equal scikit-image's (Gaussian 11×11 window, σ 1.5, Wang et al. 2004)."""
    metrics = pytest.importorskip("skimage.metrics")
    from latent_diffusion.evaluation.metrics import psnr, ssim
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    unit = [(((x[i, 0] + 1) / 2).double().numpy(), ((y[i, 0] + 1) / 2).double().numpy()) for i in range(3)]
    expected_ssim = [metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                                   use_sample_covariance=False) for a, b in unit]
    expected_psnr = [metrics.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in unit]
    assert torch.allclose(ssim(x, y).double(), torch.tensor(expected_ssim), atol=1e-5)
    assert torch.allclose(psnr(x, y).double(), torch.tensor(expected_psnr), atol=1e-4)


def test_controlnet_experiment_measures_layout_against_the_scenes_maps():
    controlnet = load("controlnet")
    captions, maps = controlnet.held_out(3, seed=7)
    assert captions == [generate_scene(7, i).caption for i in range(3)] and maps.shape == (3, 3, 64, 64)
    perfect = controlnet.measure([render_scene(generate_scene(7, i)) for i in range(3)], captions, maps)
    assert perfect["layout_iou"] == 1.0 and perfect["caption"]["all"] == 1.0
    shifted = controlnet.measure([render_scene(generate_scene(7, i + 1)) for i in range(3)], captions, maps)
    assert shifted["layout_iou"] < 0.5


def test_controlnet_experiment_unplaced_prompts_leave_the_position_to_the_map():
    controlnet = load("controlnet")
    prompts, captions, maps = controlnet.unplaced(3, seed=7)
    first = generate_scene(7, 0).objects[0]
    assert prompts[0] == f"a {first.size} {first.colour} {first.shape}" and captions[0] == first.phrase
    assert all(" and " not in caption for caption in captions) and maps.shape == (3, 3, 64, 64)
