"""`ldm generate --image-prompt IMAGE --ip-adapter FILE --image-encoder PATH [--image-prompt-scale S]`: the image
steers the result at the scale given; incomplete or wrong flags are one line naming them."""

import pytest
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.conditioning.image_prompt import cross_attention_layers
from latent_diffusion.formats.model import save_model
from latent_diffusion.unet import UNetModel

from conditioning.test_image_prompt import ip_adapter_state, photo, write_image_encoder
from conftest import TINY_SD1, tiny_original_parts
from formats.test_ip_adapter import write_ip_adapter

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(an SD single file, an IP-Adapter file for it, its image encoder folder, an image prompt)."""
    folder = tmp_path_factory.mktemp("ip")
    parts = tiny_original_parts(TINY_SD1, resolution=32)
    save_model(parts, folder / "tiny-sd.safetensors", "original")
    widths = [layer.to_k.out_features for _, layer in cross_attention_layers(UNetModel(parts.unet_config))]
    adapter = write_ip_adapter(ip_adapter_state("ip-adapter", widths, TINY_SD1[0].context_dim, seed=8),
                               folder / "ip-adapter.bin")
    photo(40, 30, seed=4).save(folder / "prompt.png")
    return folder / "tiny-sd.safetensors", adapter, write_image_encoder(folder / "image_encoder"), folder / "prompt.png"


def generate(files, out, *flags) -> int:
    model = files[0]
    return main(["generate", "a red cube", "--model", str(model), "--steps", "2", "--seed", "0", "--height", "32",
                 "--width", "32", "--device", "cpu", "-o", str(out), *map(str, flags)])


def test_the_image_prompt_steers_the_image_at_its_scale(files, tmp_path):
    _, adapter, encoder, image = files
    ip = ["--ip-adapter", adapter, "--image-encoder", encoder, "--image-prompt", image]
    assert generate(files, tmp_path / "plain.png") == 0
    assert generate(files, tmp_path / "ip.png", *ip) == 0
    assert generate(files, tmp_path / "off.png", *ip, "--image-prompt-scale", 0) == 0
    plain, steered, off = (Image.open(tmp_path / f"{name}.png").tobytes() for name in ("plain", "ip", "off"))
    assert steered != plain and off == plain


@pytest.mark.parametrize("flags, message", [
    (["--image-prompt", "{image}"], "--image-prompt: an image prompt needs --image-prompt IMAGE, --ip-adapter"),
    (["--image-prompt-scale", "0.5"], "--image-prompt-scale: give --image-prompt, --ip-adapter and --image-encoder"),
    (["--ip-adapter", "{missing}", "--image-encoder", "{encoder}", "--image-prompt", "{image}"], "IP-Adapter file not found"),
    (["--ip-adapter", "{adapter}", "--image-encoder", "{encoder}", "--image-prompt", "{image}",
      "--image-prompt-scale", "20"], "--image-prompt-scale = 20.0: expected a finite number from -10 to 10"),
])
def test_bad_image_prompt_flags_are_one_line(files, tmp_path, capsys, flags, message):
    _, adapter, encoder, image = files
    names = {"image": image, "adapter": adapter, "encoder": encoder, "missing": tmp_path / "missing.bin"}
    assert generate(files, tmp_path / "x.png", *[flag.format(**names) for flag in flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
