"""`ldm train-lora`, `ldm train-embedding` and `ldm generate --lora/--embedding` from the command line: the files
they write are the ones generate applies, and bad input is one line naming the flag."""

import pytest
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.cli.generate import embedding_argument, lora_argument
from latent_diffusion.formats.model import save_model

from conftest import TINY_SD1, tiny_original_parts

TRAINING = ["--steps", "2", "--batch-size", "2", "--resolution", "32", "--lr", "1e-2", "--device", "cpu",
            "--set", "sample_steps=2"]


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd.safetensors"
    save_model(tiny_original_parts(TINY_SD1, resolution=32), path, "original")
    return path


def test_lora_and_embedding_arguments_take_a_weight_or_token_after_the_last_colon():
    assert lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_argument("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert lora_argument("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert lora_argument("runs/a:b/heart.safetensors:0.5") == ("runs/a:b/heart.safetensors", 0.5)
    assert embedding_argument("thing.pt") == ("thing.pt", None)
    assert embedding_argument("thing.pt:<thing>") == ("thing.pt", "<thing>")


def test_trained_lora_and_embedding_are_what_generate_applies(sd_file, shapes_folder, tmp_path, capsys):
    generate = ["generate", "a red circle", "--model", str(sd_file), "--steps", "2", "--seed", "0",
                "--height", "32", "--width", "32", "--device", "cpu"]
    assert main([*generate, "-o", str(tmp_path / "plain.png")]) == 0
    assert main(["train-lora", "--model", str(sd_file), "--data", str(shapes_folder), "--out", str(tmp_path / "lora"),
                 "--rank", "2", *TRAINING]) == 0
    lora = tmp_path / "lora" / "lora.safetensors"
    assert main([*generate, "--lora", f"{lora}:0.8", "-o", str(tmp_path / "lora.png")]) == 0
    captions = tmp_path / "captioned"
    captions.mkdir()
    for image in sorted(shapes_folder.glob("*.png"))[:4]:
        Image.open(image).save(captions / image.name)
        (captions / image.with_suffix(".txt").name).write_text("a <dot> on white")
    embedding = tmp_path / "dot.safetensors"
    assert main(["train-embedding", "--model", str(sd_file), "--data", str(captions), "--token", "<dot>",
                 "--out", str(embedding), *TRAINING]) == 0
    assert embedding.is_file() and (tmp_path / "dot.run" / "learned_embeds.safetensors").is_file()
    assert main([*generate[:1], "a dot on white", *generate[2:], "--embedding", str(embedding),
                 "-o", str(tmp_path / "dot.png")]) == 0
    assert "embedding 'dot'" in capsys.readouterr().out  # called by its file's name, as AUTOMATIC1111 does
    plain, adapted = (Image.open(tmp_path / name).tobytes() for name in ("plain.png", "lora.png"))
    assert plain != adapted


def test_bad_adapter_input_is_one_line_naming_the_flag(sd_file, shapes_folder, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(sd_file), "--steps", "2", "--height", "32", "--device", "cpu",
                 "--lora", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.png")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err
    assert main(["train-embedding", "--model", str(sd_file), "--data", str(shapes_folder), "--token", "<x>",
                 "--out", str(tmp_path / "x.txt"), *TRAINING]) == 2
    assert "expected the embedding file to write" in capsys.readouterr().err
    assert main(["train-lora", "--model", str(tmp_path / "nothing"), "--data", str(shapes_folder), "--out",
                 str(tmp_path / "run"), *TRAINING]) == 2
    assert "--model" in capsys.readouterr().err
