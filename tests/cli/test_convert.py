"""`ldm convert` between the three formats, and `ldm generate --model` on each: the same model, the same image."""

from pathlib import Path

import numpy as np
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.formats.model import load_model, save_model

from conftest import TINY_SD1, assert_same_parts, tiny_original_parts


def test_convert_round_trip_through_every_format_and_generate_from_each(tmp_path, capsys):
    parts = tiny_original_parts(TINY_SD1)  # resolution 512: what an original file without its YAML implies
    native, original, diffusers, back = (tmp_path / "native", tmp_path / "model.safetensors",
                                         tmp_path / "diffusers", tmp_path / "back")
    save_model(parts, native, "native")
    for source, dest, fmt in ((native, original, "original"), (original, diffusers, "diffusers"),
                              (diffusers, back, "native")):
        assert main(["convert", str(source), str(dest), "--to", fmt]) == 0
    assert f"wrote {back} (native)" in capsys.readouterr().out
    assert_same_parts(parts, load_model(back))
    images = []
    for model in (native, original, diffusers):
        out = tmp_path / f"{model.name}.png"
        assert main(["generate", "a red circle", "--model", str(model), "--steps", "3", "--device", "cpu",
                     "--height", "64", "--width", "64", "--seed", "0", "-o", str(out)]) == 0
        images.append(np.asarray(Image.open(out)))
    assert images[0].shape == (64, 64, 3)
    assert all(np.array_equal(images[0], im) for im in images[1:])


def test_convert_to_half_precision_and_bad_sources_are_clear_errors(tmp_path, capsys):
    save_model(tiny_original_parts(TINY_SD1), tmp_path / "native", "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "half.safetensors"), "--to", "original",
                 "--dtype", "fp16"]) == 0
    assert all(v.dtype.itemsize == 2 for v in load_model(tmp_path / "half.safetensors").unet.values())
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "x"), "--to", "native"]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_converting_a_native_model_keeps_its_training_recipe(tmp_path):
    from latent_diffusion.config import AutoencoderRunConfig, LDMRunConfig, load_config

    source = Path(__file__).parents[2] / "models" / "ldm-shapes"
    assert main(["convert", str(source), str(tmp_path / "copy"), "--to", "native"]) == 0
    for name, cls in (("config.yaml", LDMRunConfig), ("autoencoder/config.yaml", AutoencoderRunConfig)):
        assert load_config(tmp_path / "copy" / name, cls) == load_config(source / name, cls)


def test_the_shipped_models_state_the_recipes_they_were_trained_with():
    from latent_diffusion.config import AutoencoderRunConfig, LDMRunConfig, load_config

    root = Path(__file__).parents[2]
    for model, recipe in (("ldm-shapes", "ldm/shapes-clauses.yaml"), ("ldm-fashion", "ldm/fashion.yaml")):
        shipped, source = (load_config(root / "models" / model / "config.yaml", LDMRunConfig),
                           load_config(root / "configs" / recipe, LDMRunConfig))
        assert (shipped.training, shipped.data, shipped.unet) == (source.training, source.data, source.unet)
    for model, recipe in (("ldm-shapes/autoencoder", "shapes-f4"), ("autoencoder-shapes-f4", "shapes-f4"),
                          ("ldm-fashion/autoencoder", "fashion-f4"), ("autoencoder-fashion-f4", "fashion-f4")):
        shipped = load_config(root / "models" / model / "config.yaml", AutoencoderRunConfig)
        source = load_config(root / "configs" / "autoencoder" / f"{recipe}.yaml", AutoencoderRunConfig)
        assert (shipped.training, shipped.loss, shipped.data) == (source.training, source.loss, source.data)
