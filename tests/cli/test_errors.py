"""Every subcommand answers bad input with exit code 2 and one line naming what is wrong: no traceback, nothing
written. Runs that fail (divergence) say so in one line too."""

import os
from pathlib import Path
from dataclasses import replace

import pytest
from PIL import Image

import latent_diffusion.training.ldm as ldm_training
from latent_diffusion.cli import main
from latent_diffusion.config import ConditioningConfig, SamplingConfig, save_config

from conftest import tiny_ldm_config, tiny_run_config

BUNDLED = "models/ldm-shapes"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shapes_folder, autoencoder_run):
    """Files the bad commands point at; none of them is changed by any command."""
    root = tmp_path_factory.mktemp("inputs")
    save_config(tiny_run_config(max_steps=2), root / "ae.yaml")
    save_config(replace(tiny_ldm_config(autoencoder_run, max_steps=2), sampling=SamplingConfig()), root / "ldm.yaml")
    clip = replace(tiny_ldm_config(autoencoder_run, max_steps=2), conditioning=ConditioningConfig(encoder="clip"))
    save_config(clip, root / "clip.yaml")
    (root / "empty.yaml").write_text("")
    (root / "broken.yaml").write_text("training: {batch_size: 4\nmodel: [\n")
    (root / "a_file").write_text("not a folder")
    (root / "random.ckpt").write_bytes(os.urandom(4096))
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    unreadable = root / "unreadable"
    unreadable.mkdir()
    for i in range(4):
        (unreadable / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    uncaptioned = root / "uncaptioned"
    uncaptioned.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(uncaptioned / f"{i}.png")
    (uncaptioned / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "label": 3}}\n'
                                                        for i in range(8)))  # no caption column at all
    return root


def _rows(root, shapes, ae_run):
    ae = ["train-autoencoder", "--config", f"{root}/ae.yaml", "--data", shapes, "--device", "cpu", "--out"]
    ldm = ["train", "--config", f"{root}/ldm.yaml", "--data", shapes, "--device", "cpu", "--out"]
    gen = ["generate", "a small red circle", "--model", BUNDLED, "--device", "cpu", "--steps", "2", "-o"]
    return [
        (["make-shapes", "{out}", "--count", "0"], "--count: 0: expected a positive integer"),
        (["make-shapes", f"{root}/a_file/shapes", "--count", "2"], "a_file"),
        (["make-shapes", "{out}", "--seed", str(2 ** 70)], "expected a seed"),
        (ae + ["{out}", "--set", "training.batch_size=0"], "training.batch_size = 0: expected a positive integer"),
        (ae + ["{out}", "--set", "training.checkpoint_every=0"], "training.checkpoint_every = 0"),
        (ae + ["{out}", "--set", "training.max_steps=-3"], "training.max_steps = -3"),
        (ae + ["{out}", "--set", "training.learning_rate=-1e-4"], "training.learning_rate = -0.0001: expected a "
                                                                 "finite number >= 0"),
        (ae + ["{out}", "--set", "training.seed=99999999999999999999"], "training.seed"),
        (["train-autoencoder", "--config", f"{root}/empty.yaml", "--data", shapes, "--out", "{out}"],
         "empty.yaml: expected a YAML mapping"),
        (["train-autoencoder", "--config", f"{root}/broken.yaml", "--data", shapes, "--out", "{out}"],
         "broken.yaml: not valid YAML at line"),
        (["train-autoencoder", "--config", f"{root}/ae.yaml", "--data", shapes, "--device", "bogus", "--out",
          "{out}"], "--device 'bogus'"),
        (ae + [f"{root}/a_file/run"], "lies under"),
        (ae + [f"{root}/a_file"], "is a file, expected a folder"),
        (["train-autoencoder", "--config", f"{root}/ae.yaml", "--data", f"{root}/unreadable", "--out", "{out}",
          "--set", "training.batch_size=2"], "none of its 4 images can be read"),
        (ldm + ["{out}", "--set", "training.batch_size=0"], "training.batch_size = 0"),
        (["train", "--config", f"{root}/ldm.yaml", "--data", f"{root}/uncaptioned", "--out", "{out}"],
         "none of its 8 images has a caption"),
        (["train", "--config", f"{root}/clip.yaml", "--data", shapes, "--out", "{out}"],
         "CLIP text encoder would have random weights"),
        (["eval-autoencoder", str(ae_run), "--data", shapes, "--num-images", "0", "--out", "{out}"],
         "--num-images: 0: expected a positive integer"),
        (["eval-autoencoder", str(ae_run), "--data", shapes, "--out", f"{root}/a_file/eval"], "lies under"),
        (["train-features", "--data", shapes, "--out", "{out}", "--epochs", "0"], "--epochs: 0"),
        (["eval-fid", BUNDLED, "--data", shapes, "--features", f"{root}/nope", "--num", "0"], "--num: 0"),
        (["eval-adherence", BUNDLED, "--data", shapes, "--num", "0"], "--num: 0"),
        (["eval-adherence", f"{root}/nope", "--data", shapes, "--out", "{out}"], "nope"),
        (["convert", f"{root}/random.ckpt", "{out}", "--to", "native"], "not a PyTorch checkpoint"),
        (["convert", BUNDLED, f"{root}/a_file/model", "--to", "native"], "lies under"),
        (gen + ["{out}/x.png", "--guidance", "nan"], "--guidance"),
        (gen + ["{out}/x.png", "--guidance", "1e30"], "--guidance"),
        (gen + ["{out}/x.png", "--height", "0"], "--height"),
        (gen + ["{out}/x.png", "--sampler", ""], "sampler"),
        (gen + ["{out}/x.png", "--device", "bogus"], "--device 'bogus'"),
        (gen + ["{out}/x.png", "--image", f"{root}/empty.png"], "--image"),
        (gen + ["{out}/x.png", "--image", f"{root}/corrupt.png"], "--image"),
        (gen + [f"{root}/a_file/x.png"], "a_file"),
        (gen + ["{out}/x.png", "--original-size", "64", "64"], "--original-size: only SDXL models take it"),
        (gen + ["{out}/x.png", "--refiner", BUNDLED], "--refiner: only SDXL models take it"),
        (gen + ["{out}/x.png", "--refiner-start", "0.5"], "--refiner-start without --refiner"),
        (["serve", "--model", f"{root}/nope"], "nope does not exist"),
        (["serve", "--models-dir", f"{root}/a_file"], "--models-dir"),
        (["serve", "--lora-dir", f"{root}/nope"], "--lora-dir"),
        (["serve", "--workers", "0"], "--workers"),
        (["serve", "--host", "nowhere.invalid"], "--host nowhere.invalid: not an address"),
    ]


def _snapshot(*folders):
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*")}


def _run(argv):
    """`ldm ARGV`'s exit code (argparse's errors exit; the `ldm` script returns main's code)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_bad_input_to_every_subcommand_is_one_line_exit_2_and_writes_nothing(inputs, shapes_folder, autoencoder_run,
                                                                             tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])  # the bundled model's path
    monkeypatch.delenv("LDM_DEBUG", raising=False)
    watched = (inputs, shapes_folder, autoencoder_run, tmp_path)
    failures = []
    for i, (argv, expected) in enumerate(_rows(inputs, str(shapes_folder), autoencoder_run)):
        out = tmp_path / f"out{i}"
        argv = [a.replace("{out}", str(out)) for a in argv]
        before = _snapshot(*watched)
        code = _run(argv)
        err = capsys.readouterr().err.strip()
        if code != 2 or len(err.splitlines()) != 1 or "Traceback" in err or expected not in err:
            failures.append(f"ldm {' '.join(argv)}\n  -> exit {code}: {err[-600:]!r}")
        elif _snapshot(*watched) != before or out.exists():
            failures.append(f"ldm {' '.join(argv)}\n  -> wrote files")
    assert not failures, "\n".join(failures)


def test_a_diverging_run_ends_with_one_line_and_exit_1(inputs, shapes_folder, tmp_path, capsys, monkeypatch):
    real = ldm_training.diffusion_loss
    monkeypatch.setattr(ldm_training, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    code = _run(["train", "--config", f"{inputs}/ldm.yaml", "--data", str(shapes_folder), "--out",
                 str(tmp_path / "run"), "--device", "cpu", "--set", "training.max_steps=20"])
    err = capsys.readouterr().err.strip()  # the progress bars, then the error
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(errors) == 1 and "5 non-finite diffusion losses in a row" in errors[0]
    assert errors[0] == err.splitlines()[-1] and "Traceback" not in err


def test_a_full_disk_is_one_line_naming_the_file(inputs, shapes_folder, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from latent_diffusion.files import weights as checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    code = _run(["train-autoencoder", "--config", f"{inputs}/ae.yaml", "--data", str(shapes_folder), "--out",
                 str(tmp_path / "run"), "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1
    assert "No space left on device: " in errors[0] and "the disk is full" in errors[0]
    assert not list((tmp_path / "run").rglob("*.tmp"))  # the torn temporary file is gone
