"""`ldm generate` as AUTOMATIC1111 and diffusers users expect it: a seed per image, one file per image in the format
of its extension carrying its parameters, prompts from a file, every sampler option reachable, and bad input as one
clear line before any work."""

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.images import read_parameters, tensor_to_pil
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.pipeline.infotext import parse_infotext
from latent_diffusion.samplers import GridOptions, SAMPLERS

PROMPT = "a small green triangle in the center"


@pytest.fixture
def loads(bundled_pipe, monkeypatch):
    """`ldm generate` on the bundled model, loaded once for the module; the list of its loads."""
    calls = []

    def from_pretrained(cls, *args, **kwargs):
        calls.append(args)
        bundled_pipe.vae_tile = None
        return bundled_pipe
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(from_pretrained))
    return calls


def generate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# --- seeds -----------------------------------------------------------------------------------------------------

def test_cli_image_2_of_seed_s_is_the_image_of_seed_s_plus_2(loads, tmp_path, capsys):
    common = ("--steps", 2, "--sampler", "Euler a", "--eta", 0.8)
    assert generate(capsys, PROMPT, "-o", tmp_path / "batch.png", "--seed", 40, "--num-images", 4, *common)[0] == 0
    assert generate(capsys, PROMPT, "-o", tmp_path / "alone.png", "--seed", 42, *common)[0] == 0
    assert np.abs(pixels(tmp_path / "batch-2.png") - pixels(tmp_path / "alone.png")).max() <= 1
    assert "Seed: 42," in read_parameters(tmp_path / "batch-2.png")


def test_without_seed_a_random_one_is_printed_and_draws_the_same_again(loads, tmp_path, capsys):
    code, out, _ = generate(capsys, PROMPT, "-o", tmp_path / "a.png", "--steps", 2)
    seed = int(out.split("seed ")[1].split()[0])
    assert code == 0 and "random" in out
    assert generate(capsys, PROMPT, "-o", tmp_path / "b.png", "--steps", 2, "--seed", seed)[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


# --- outputs ---------------------------------------------------------------------------------------------------

def test_num_images_writes_one_file_each_and_the_grid(loads, tmp_path, capsys):
    code, out, _ = generate(capsys, PROMPT, "-o", tmp_path / "out.png", "--num-images", 3, "--grid", "--steps", 2,
                            "--seed", 1)
    assert code == 0 and f"wrote {tmp_path / 'out.png'} … out-2.png and out-grid.png" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out-2.png", "out-grid.png", "out.png"]
    assert Image.open(tmp_path / "out-grid.png").size == (2 + 2 * 66, 2 + 2 * 66)  # 2×2 cells of 64 + 2 padding


def test_a_folder_as_output_holds_the_files(loads, tmp_path, capsys):
    assert generate(capsys, PROMPT, "-o", f"{tmp_path}/new/", "--num-images", 2, "--steps", 2)[0] == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["out-1.png", "out.png"]
    (tmp_path / "existing").mkdir()
    assert generate(capsys, PROMPT, "-o", tmp_path / "existing", "--steps", 2)[0] == 0
    assert (tmp_path / "existing" / "out.png").is_file()


@pytest.mark.parametrize("name,fmt,magic", [("x.jpg", "JPEG", b"\xff\xd8\xff"), ("x.JPEG", "JPEG", b"\xff\xd8\xff"),
                                            ("x.webp", "WEBP", b"RIFF")])
def test_the_extension_picks_the_format_and_the_parameters_ride_in_exif(loads, tmp_path, capsys, name, fmt, magic):
    args = (PROMPT, "--steps", 2, "--seed", 9)
    assert generate(capsys, *args, "-o", tmp_path / name)[0] == 0
    assert generate(capsys, *args, "-o", tmp_path / "x.png")[0] == 0
    assert (tmp_path / name).read_bytes().startswith(magic) and Image.open(tmp_path / name).format == fmt
    assert np.abs(pixels(tmp_path / name) - pixels(tmp_path / "x.png")).mean() < 8  # lossy, but the same image
    assert read_parameters(tmp_path / name) == read_parameters(tmp_path / "x.png")


def test_png_parameters_in_a1111_layout_and_from_png_redraws_the_image(loads, tmp_path, capsys):
    assert generate(capsys, PROMPT, "-o", tmp_path / "a.png", "--num-images", 2, "--seed", 3, "--steps", 2,
                    "--guidance", 4, "--sampler", "euler a", "--negative", "blue, large")[0] == 0
    assert Image.open(tmp_path / "a-1.png").text["parameters"] == (
        f"{PROMPT}\nNegative prompt: blue, large\n"
        "Steps: 2, Sampler: Euler a, CFG scale: 4.0, Seed: 4, Size: 64x64, Model: ldm-shapes")
    assert generate(capsys, "--from-png", tmp_path / "a-1.png", "-o", tmp_path / "b.png")[0] == 0
    assert np.abs(pixels(tmp_path / "a-1.png") - pixels(tmp_path / "b.png")).max() <= 1  # batch of 2 against 1
    assert read_parameters(tmp_path / "b.png") == read_parameters(tmp_path / "a-1.png")
    assert generate(capsys, "--from-png", tmp_path / "a-1.png", "--steps", 3, "-o", tmp_path / "c.png")[0] == 0
    assert parse_infotext(read_parameters(tmp_path / "c.png")) == {**parse_infotext(read_parameters(
        tmp_path / "a-1.png")), "steps": 3}


def test_img2img_and_inpainting_with_the_bundled_model(loads, tmp_path, capsys):
    """--image alone redraws the picture at its size (strength 0.75 by default), written in the parameters;
    --mask keeps the pixels outside the mask exactly; --from-png with the same --image draws it again."""
    assert generate(capsys, PROMPT, "-o", tmp_path / "source.png", "--steps", 4, "--seed", 1)[0] == 0
    assert generate(capsys, "a large red circle in the center", "--image", tmp_path / "source.png", "-o",
                    tmp_path / "edit.png", "--steps", 4, "--seed", 2)[0] == 0
    source, edit = pixels(tmp_path / "source.png"), pixels(tmp_path / "edit.png")
    assert edit.shape == source.shape and np.abs(edit - source).mean() > 2
    assert "Denoising strength: 0.75" in read_parameters(tmp_path / "edit.png")
    mask = np.zeros(source.shape[:2], dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert generate(capsys, "a large red circle in the center", "--image", tmp_path / "source.png", "--mask",
                    tmp_path / "mask.png", "-o", tmp_path / "filled.png", "--steps", 4, "--seed", 2)[0] == 0
    filled = pixels(tmp_path / "filled.png")
    assert np.array_equal(filled[mask == 0], source[mask == 0]) and np.abs(filled - source)[mask > 0].mean() > 2
    assert generate(capsys, "--from-png", tmp_path / "edit.png", "--image", tmp_path / "source.png", "-o",
                    tmp_path / "again.png")[0] == 0
    assert np.abs(pixels(tmp_path / "again.png") - edit).max() <= 1


def test_prompts_file_draws_each_prompt_into_its_own_files_with_one_load(loads, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\n\na small red circle in the center\n   \na large blue square on the left\n")
    code, out, _ = generate(capsys, "--prompts", prompts, "-o", tmp_path / "out" / "s.png", "--num-images", 2,
                            "--steps", 2, "--seed", 7)
    assert code == 0 and len(loads) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s-0000-1.png", "s-0000.png", "s-0001-1.png",
                                                                     "s-0001.png"]
    first, second = (parse_infotext(read_parameters(tmp_path / "out" / f"s-000{p}-1.png")) for p in (0, 1))
    assert (first["prompt"], first["seed"]) == ("a small red circle in the center", 8)
    assert (second["prompt"], second["seed"]) == ("a large blue square on the left", 8)


# --- samplers --------------------------------------------------------------------------------------------------

def test_karras_and_eta_reach_the_sampler(loads, bundled_pipe, tmp_path, capsys, monkeypatch):
    seen = {}
    original = SAMPLERS["euler_a"]

    @functools.wraps(original.sample)
    def spy(denoiser, noise, grid, **kwargs):
        seen.update(kwargs, grid=grid)
        return original.sample(denoiser, noise, grid, **kwargs)
    monkeypatch.setitem(SAMPLERS, "euler_a", dataclasses.replace(original, sample=spy))
    assert generate(capsys, PROMPT, "-o", tmp_path / "k.png", "--sampler", "euler_a", "--karras", "--eta", 0.3,
                    "--seed", 2, "--steps", 3)[0] == 0
    assert seen["grid"] == original.make_grid(bundled_pipe.schedule, 3, GridOptions(karras=True)) and seen["eta"] == 0.3
    options = dict(sampler="euler_a", eta=0.3, seed=2, steps=3, progress=False)
    assert np.array_equal(pixels(tmp_path / "k.png"),
                          np.asarray(tensor_to_pil(bundled_pipe.generate_tensors(PROMPT, karras=True, **options)[0])))
    assert not torch.equal(bundled_pipe.generate_tensors(PROMPT, karras=True, **options),
                           bundled_pipe.generate_tensors(PROMPT, karras=False, **options))
    assert "Sampler: Euler a Karras, " in read_parameters(tmp_path / "k.png")


def test_a1111_sampler_names_are_aliases(loads, tmp_path, capsys):
    common = (PROMPT, "--seed", 4, "--steps", 3)
    assert generate(capsys, *common, "--sampler", "dpm++ 2m KARRAS", "-o", tmp_path / "alias.png")[0] == 0
    assert generate(capsys, *common, "--sampler", "dpmpp_2m", "--karras", "-o", tmp_path / "flag.png")[0] == 0
    assert generate(capsys, *common, "--sampler", "DPM++ 2M", "-o", tmp_path / "plain.png")[0] == 0
    assert np.array_equal(pixels(tmp_path / "alias.png"), pixels(tmp_path / "flag.png"))
    assert not np.array_equal(pixels(tmp_path / "alias.png"), pixels(tmp_path / "plain.png"))
    assert "Sampler: DPM++ 2M Karras, " in read_parameters(tmp_path / "alias.png")


def test_help_lists_the_samplers_and_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "ddpm, ddim, plms, euler, euler_a, heun, dpmpp_2m" in text and "DPM++ 2M" in text
    assert all(f"{flag} " in text for flag in ("--karras", "--eta", "--grid", "--prompts", "--from-png"))


# --- bad input -------------------------------------------------------------------------------------------------

BAD = {
    "guidance nan": (["--guidance", "nan"], "--guidance = nan: expected a finite number from 0 to 100"),
    "guidance inf": (["--guidance", "inf"], "--guidance = inf"),
    "guidance 1e30": (["--guidance", "1e30"], "--guidance = 1e+30"),
    "guidance -1": (["--guidance", "-1"], "--guidance = -1.0"),
    "guidance rescale": (["--guidance-rescale", "2"], "--guidance-rescale = 2.0"),
    "height 0": (["--height", "0"], "--height = 0: expected a positive multiple of 16"),
    "height 30": (["--height", "30"], "--height = 30"),
    "width 100000": (["--width", "100000"], "--width = 100000: expected a positive multiple of 16"),
    "size beyond memory": (["--height", "16384", "--width", "16384"],
                           "--height/--width: one 16384×16384 image needs about"),
    "num-images 0": (["--num-images", "0"], "--num-images = 0: expected 1 to 1000"),
    "num-images 10000": (["--num-images", "10000"], "--num-images = 10000: expected 1 to 1000"),
    "grid too large": (["--grid", "--num-images", "1000", "--height", "512", "--width", "512"], "--grid: a grid"),
    "empty sampler": (["--sampler", ""], "--sampler: unknown sampler ''; known samplers: ddim, ddpm"),
    "unknown sampler": (["--sampler", "lms"], "--sampler: unknown sampler 'lms'"),
    "karras of ddim": (["--sampler", "DDIM Karras"], "ddim has no Karras"),
    "--karras with ddim": (["--sampler", "ddim", "--karras"], "--karras: sampler ddim takes no karras"),
    "--eta with euler": (["--sampler", "euler", "--eta", "0.5"], "--eta: sampler euler takes no eta (samplers "
                                                                 "that do: ddim, euler_a)"),
    "--eta of the default": (["--eta", "0.5"], "--eta: sampler dpmpp_2m takes no eta"),
    "eta 2": (["--sampler", "ddim", "--eta", "2"], "--eta = 2.0"),
    "steps 0": (["--steps", "0"], "--steps = 0: expected an integer from 1 to 1000"),
    "steps 5000": (["--steps", "5000"], "--steps = 5000"),
    "seed 2**64": (["--seed", str(2**64)], "--seed = 18446744073709551616: expected an integer from 0 to 2**64"),
    "seed -5": (["--seed", "-5"], "--seed = -5"),
    "seed + k beyond 2**64": (["--seed", str(2**64 - 1), "--num-images", "2"], "2**64 - 2 (image k uses seed"),
    "gif": (["-o", "{out}/x.gif"], "-o: {out}/x.gif: unknown image format '.gif'"),
    "no extension": (["-o", "{out}/x"], "unknown image format '(no extension)'"),
    "under a file": (["-o", "{file}/x.png"], "is a file, not a folder"),
    "folder in the way": (["-o", "{out}/taken.png"], "taken.png is a folder, expected a file"),
    "folder in the way of image 1": (["-o", "{out}/y.png", "--num-images", "2"], "y-1.png is a folder, expected a"),
    "image missing": (["--image", "{missing}"], "--image: {missing} does not exist"),
    "image folder": (["--image", "{inputs}"], "--image: {inputs} is a folder"),
    "image empty": (["--image", "{empty}"], "--image: {empty} is empty"),
    "image corrupt": (["--image", "{corrupt}"], "--image: {corrupt} is not a readable image"),
    "mask corrupt": (["--mask", "{corrupt}"], "--mask: {corrupt} is not a readable image"),
    "mask without image": (["--mask", "{plain}"], "--mask without --image: a mask marks the region"),
    "strength without image": (["--strength", "0.5"], "--strength without --image"),
    "strength too small": (["--image", "{plain}", "--strength", "0.2"], "--strength = 0.2 with 2 steps runs no"),
    "strength 2": (["--image", "{plain}", "--strength", "2"], "--strength = 2.0: expected a finite number"),
    "prompts missing": (["--prompts", "{missing}", "--no-prompt"], "--prompts: {missing} does not exist"),
    "prompts empty": (["--prompts", "{comments}", "--no-prompt"], "--prompts: {comments} holds no prompts"),
    "prompt and prompts": (["--prompts", "{comments}"], "give PROMPT or --prompts FILE, not both"),
    "no prompt": (["--no-prompt"], "nothing to draw"),
    "from-png without parameters": (["--from-png", "{plain}"], "carries no generation parameters"),
    "from-png missing": (["--from-png", "{missing}"], "--from-png: {missing} does not exist"),
    "vae tile": (["--vae-tile", "1"], "--vae-tile = 1"),
}


@pytest.fixture
def inputs(tmp_path):
    """Paths for the bad-input cases: {out} (empty but for a folder named taken.png), {file}, {inputs}..."""
    folder, out = tmp_path / "inputs", tmp_path / "out"
    (out / "taken.png").mkdir(parents=True)
    (out / "y-1.png").mkdir()
    folder.mkdir()
    (folder / "file").write_text("x")
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "comments.txt").write_text("# nothing\n\n")
    Image.new("RGB", (8, 8)).save(folder / "plain.png")
    return {"out": out, "file": folder / "file", "inputs": folder, "missing": folder / "missing.png",
            "empty": folder / "empty.png", "corrupt": folder / "corrupt.png", "plain": folder / "plain.png",
            "comments": folder / "comments.txt"}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(loads, inputs, capsys, case):
    argv, expected = BAD[case]
    argv = [a.format(**inputs) for a in argv]
    prompt = [] if "--no-prompt" in argv else [PROMPT]
    argv = [a for a in argv if a != "--no-prompt"]
    before = sorted(inputs["out"].rglob("*"))
    output = [] if "-o" in argv else ["-o", inputs["out"] / "img.png"]
    steps = [] if "--steps" in argv else ["--steps", 2]
    code, out, err = generate(capsys, *prompt, *output, *argv, *steps)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("ldm generate: error: ") and "Traceback" not in err
    assert expected.format(**inputs) in err
    assert sorted(inputs["out"].rglob("*")) == before and "sampling:" not in err


def test_an_unwritable_folder_is_refused_before_sampling(loads, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    code, _, err = generate(capsys, PROMPT, "-o", tmp_path / "x.png", "--steps", 2)
    assert code == 2 and f"cannot write in {tmp_path} (read-only)" in err
    assert not (tmp_path / "x.png").exists()


def test_a_bogus_device_is_a_clear_error(tmp_path, capsys):
    code, _, err = generate(capsys, PROMPT, "-o", tmp_path / "x.png", "--device", "bogus")
    assert code == 2 and "--device 'bogus'" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


# --- end to end ------------------------------------------------------------------------------------------------

def run_ldm(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latent_diffusion.cli", "generate", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_end_to_end_files_seed_line_and_no_loading_bar(tmp_path):
    done = run_ldm(PROMPT, "--num-images", 2, "--steps", 2, "--grid", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("seed ") and "(random" in done.stdout
    assert "sampling" in done.stderr and "Loading weights" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out-grid.png", "out.png"]


def test_end_to_end_bad_guidance_is_one_line_and_writes_nothing(tmp_path):
    done = run_ldm(PROMPT, "--guidance", "nan", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["ldm generate: error: --guidance = nan: expected a finite number "
                                                "from 0 to 100 (0: unconditional, 1: no guidance, usually 3-15)"]
    assert not any(tmp_path.iterdir())


def test_generating_again_to_the_same_file_replaces_it(loads, tmp_path, capsys):
    out = tmp_path / "again.png"
    assert generate(capsys, PROMPT, "-o", out, "--seed", 1, "--steps", 2)[0] == 0
    first = pixels(out)
    code, _, err = generate(capsys, PROMPT, "-o", out, "--seed", 2, "--steps", 2)
    assert code == 0, err
    assert "Seed: 2," in read_parameters(out) and not np.array_equal(pixels(out), first)


def test_cli_generate_writes_an_image(ldm_run, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a small red circle in the center", "-o", str(out), "--model", str(ldm_run),
                 "--steps", "2", "--num-images", "2", "--device", "cpu"]) == 0
    assert out.is_file()
    assert main(["generate", "x", "--model", str(tmp_path), "--device", "cpu"]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    tiled = tmp_path / "tiled.png"  # 64×48 pixels: a 32×24 latent (f = 2), decoded in overlapping 8×8 tiles
    assert main(["generate", "a small red circle", "-o", str(tiled), "--model", str(ldm_run), "--steps", "2",
                 "--height", "64", "--width", "48", "--vae-tile", "8", "--device", "cpu"]) == 0
    assert Image.open(tiled).size == (48, 64)
    assert main(["generate", "x", "--model", str(ldm_run), "--vae-tile", "1", "--device", "cpu"]) == 2
    assert "--vae-tile = 1" in capsys.readouterr().err
