"""`ldm upscale IN -o OUT --model MODEL`: the output is the input times the autoencoder's factor, with its
parameters; the same seed draws the same image; a model without a low-resolution condition is one clear line."""

import dataclasses

import pytest
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.formats.model import save_model
from latent_diffusion.images import read_parameters

from conftest import TINY_SD1, tiny_original_parts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(a random tiny super-resolution model (f = 2: 16² → 32²), a plain one)."""
    folder = tmp_path_factory.mktemp("upscale")
    parts = tiny_original_parts(TINY_SD1, resolution=32, in_channels=7, concat_channels=3)
    parts = dataclasses.replace(parts, conditioning=dataclasses.replace(parts.conditioning, spatial="low_res"))
    save_model(parts, folder / "sr", "native")
    save_model(tiny_original_parts(TINY_SD1, resolution=32), folder / "plain", "native")
    Image.new("RGB", (16, 12), (200, 30, 30)).save(folder / "small.png")
    return folder


def test_upscale_writes_the_image_times_the_factor_with_its_parameters(models, tmp_path, capsys):
    command = ["upscale", str(models / "small.png"), "--model", str(models / "sr"), "--steps", "2", "--seed", "3",
               "--device", "cpu", "--prompt", "a red square"]
    assert main([*command, "-o", str(tmp_path / "big.png")]) == 0
    assert main([*command, "-o", str(tmp_path / "again.png")]) == 0
    big = Image.open(tmp_path / "big.png")
    assert big.size == (32, 24) and big.tobytes() == Image.open(tmp_path / "again.png").tobytes()
    parameters = read_parameters(tmp_path / "big.png")
    assert parameters.startswith("a red square\n") and "Seed: 3" in parameters and "Upscale: 2x from small.png" \
        in parameters
    assert "16x12 -> 32x24" in capsys.readouterr().out


def test_a_model_that_does_not_upscale_is_one_line(models, tmp_path, capsys):
    assert main(["upscale", str(models / "small.png"), "--model", str(models / "plain"), "--device", "cpu",
                 "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not a super-resolution model (conditioning.spatial = 'none'" in err and not (tmp_path / "x.png").exists()
