"""The models that ship in models/: they load, and they draw what they are asked for."""

from pathlib import Path

import torch

from latent_diffusion.cli import BUNDLED_MODEL, main
from latent_diffusion.evaluation.features import extract, load_feature_net
from latent_diffusion.evaluation.shapes import caption_adherence
from latent_diffusion.pipeline import Pipeline

MODELS = Path(__file__).resolve().parent.parent / "models"
ONE_OBJECT = ["a large red circle in the top left", "a small blue square at the bottom",
              "a large green triangle in the center", "a small yellow circle on the right",
              "a large purple square in the bottom right", "a small orange triangle at the top"]


def test_bundled_shapes_model_draws_single_objects_right():
    pipe = Pipeline.from_pretrained(BUNDLED_MODEL, device="cpu")
    images = pipe(ONE_OBJECT, steps=20, guidance_scale=5.0, sampler="dpmpp_2m", seed=0, progress=False)
    assert caption_adherence(images, ONE_OBJECT)["all"] >= 5 / 6  # 97 % on held-out one-object captions


TWO_OBJECTS = ["a large red circle in the top left and a small blue square at the bottom",
               "a small green triangle on the left and a large yellow square on the right",
               "a large purple circle in the center and a small orange triangle in the top right",
               "a small yellow square at the top and a large blue triangle in the bottom left"]


def test_bundled_shapes_model_binds_attributes_to_the_right_one_of_two_objects():
    pipe = Pipeline.from_pretrained(BUNDLED_MODEL, device="cpu")
    images = pipe(TWO_OBJECTS, steps=20, guidance_scale=5.0, sampler="dpmpp_2m", seed=0, progress=False)
    # 6 of 8 objects: the first bundled model, without clause tokens, got a third of such objects right
    assert caption_adherence(images, TWO_OBJECTS)["all"] >= 6 / 8


def test_generate_without_a_model_uses_the_bundled_one(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["generate", "a small green triangle in the center", "-o", str(out), "--steps", "5",
                 "--device", "cpu"]) == 0
    assert out.is_file()


def test_bundled_fashion_model_draws_the_named_class():
    pipe = Pipeline.from_pretrained(MODELS / "ldm-fashion", device="cpu")
    prompts = ["a photo of a sneaker"] * 8 + ["a photo of a trouser"] * 8
    images = pipe.generate_tensors(prompts, steps=20, guidance_scale=3.0, sampler="dpmpp_2m", seed=0,
                                   progress=False)
    _, predicted = extract(load_feature_net(MODELS / "features-fashion"), images)
    accuracy = (predicted == torch.tensor([7] * 8 + [1] * 8)).float().mean().item()
    assert accuracy >= 0.8  # 98.6 % over 1,000 samples at w = 3


def test_bundled_super_resolution_model_beats_bicubic_on_held_out_images():
    import pytest
    import torch.nn.functional as F

    from latent_diffusion.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
    from latent_diffusion.evaluation.metrics import psnr, ssim
    if not DEFAULT_ROOT.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    test = FashionMNIST(split="test")
    originals = torch.stack([test[i]["image"] for i in range(16)])
    low = F.avg_pool2d(originals, 4)  # 8×8
    pipe = Pipeline.from_pretrained(MODELS / "ldm-fashion-sr", device="cpu")
    upscaled = pipe.generate_tensors("", image=low, num_images=16, height=32, width=32, seed=0, progress=False)
    bicubic = F.interpolate(low, scale_factor=4, mode="bicubic").clamp(-1, 1)
    # 2,000 test images: 20.8 dB and SSIM 0.71 against bicubic's 16.9 dB and 0.47 (docs/experiments.md)
    assert psnr(upscaled, originals).mean() > psnr(bicubic, originals).mean() + 2
    assert ssim(upscaled, originals).mean() > ssim(bicubic, originals).mean() + 0.1
