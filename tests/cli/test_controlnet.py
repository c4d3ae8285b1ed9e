"""`ldm generate --control IMAGE --control-model FILE [--control-type T] [--control-scale S] ...`: the control
changes the image (one ControlNet, two at once, guess mode); mismatched or wrong flags are one line naming them,
before the model loads."""

import pytest
from PIL import Image, ImageDraw

from latent_diffusion.cli import main
from latent_diffusion.controlnet import ControlNet, ControlNetConfig
from latent_diffusion.formats.controlnet import save_controlnet
from latent_diffusion.formats.model import save_model

from conftest import TINY_SD1, randomised, tiny_original_parts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(an SD single file with an f=2 autoencoder, a ControlNet for it, a control image)."""
    folder = tmp_path_factory.mktemp("control")
    save_model(tiny_original_parts(TINY_SD1, resolution=32), folder / "tiny-sd.safetensors", "original")
    net = ControlNet(ControlNetConfig.of_unet(TINY_SD1[0], downsample_factor=2))
    save_controlnet(randomised(net, 5), folder / "control.safetensors")
    image = Image.new("RGB", (48, 48), "black")
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill="white")
    image.save(folder / "circle.png")
    return folder / "tiny-sd.safetensors", folder / "control.safetensors", folder / "circle.png"


def generate(files, out, *flags) -> int:
    return main(["generate", "a red cube", "--model", str(files[0]), "--steps", "2", "--seed", "0", "--height", "32",
                 "--width", "32", "--device", "cpu", "-o", str(out), *map(str, flags)])


def test_controls_change_the_image(files, tmp_path):
    _, net, image = files
    one = ["--control", image, "--control-model", net]
    assert generate(files, tmp_path / "plain.png") == 0
    assert generate(files, tmp_path / "canny.png", *one, "--control-type", "canny") == 0
    assert generate(files, tmp_path / "zero.png", *one, "--control-scale", 0) == 0
    assert generate(files, tmp_path / "two.png", *one, *one, "--control-type", "canny", "--control-type", "mask",
                    "--control-end", 0.5, "--guess-mode") == 0
    plain, canny, zero, two = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("plain", "canny", "zero", "two"))
    assert canny != plain and two not in (plain, canny) and zero == plain


@pytest.mark.parametrize("flags, message", [
    (["--control-model", "{net}"], "--control-model: give --control IMAGE too"),
    (["--guess-mode"], "--guess-mode: give --control IMAGE too"),
    (["--control", "{image}"], "--control-model: given 0 times for 1 --control; expected 1 (one per --control)"),
    (["--control", "{image}", "--control", "{image}", "--control-model", "{net}", "--control-model", "{net}",
      "--control-scale", "1", "--control-scale", "1", "--control-scale", "1"],
     "--control-scale: given 3 times for 2 --control; expected 1 or 2"),
    (["--control", "{image}", "--control-model", "{net}", "--control-type", "sketch"],
     "--control-type: unknown control type 'sketch'"),
    (["--control", "{image}", "--control-model", "{net}", "--control-start", "0.8", "--control-end", "0.2"],
     "--control-start = 0.8 and --control-end = 0.2: expected start < end"),
    (["--control", "{image}", "--control-model", "{missing}"], "--control-model: {missing} does not exist"),
])
def test_bad_control_flags_are_one_line(files, tmp_path, capsys, flags, message):
    _, net, image = files
    names = {"net": net, "image": image, "missing": tmp_path / "missing.safetensors"}
    assert generate(files, tmp_path / "x.png", *[flag.format(**names) for flag in flags]) == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
