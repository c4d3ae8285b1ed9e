"""Atomic writes: a crash mid-write keeps the old file and leaves no temporary, the temporaries of interrupted writes
are removed from a run, and `check_writable` refuses, before any work, only what cannot be written."""

import pytest

from latent_diffusion.files.atomic import atomic_write_bytes, check_writable
from latent_diffusion.training.autoencoder import train_autoencoder

from conftest import tiny_run_config


def test_an_existing_file_or_folder_of_the_wanted_kind_is_writable(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    check_writable(tmp_path / "old.png", "-o")
    check_writable(tmp_path, "--out", folder=True)
    check_writable(tmp_path / "new" / "deeper" / "image.png", "-o")


@pytest.mark.parametrize("target,folder,message", [
    ("a_file", True, "is a file, expected a folder"),
    ("a_dir", False, "is a folder, expected a file"),
    ("a_file/image.png", False, "lies under .*a_file, which is a file, not a folder"),
    ("a_file/run", True, "lies under .*a_file, which is a file, not a folder"),
])
def test_what_cannot_be_written_is_named(tmp_path, target, folder, message):
    (tmp_path / "a_file").write_bytes(b"x")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(OSError, match=message):
        check_writable(tmp_path / target, "-o", folder=folder)


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def failing_writer():
        from latent_diffusion.files.atomic import atomic_path
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        failing_writer()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_temporary_files_of_interrupted_writes_are_removed_everywhere_in_the_run(tmp_path, shapes_folder):
    run = tmp_path / "run"
    train_autoencoder(tiny_run_config(max_steps=2), shapes_folder, run, device="cpu", progress=False)
    torn = [run / ".autoencoder.safetensors.x1.tmp", run / ".config.yaml.x2.tmp",
            run / "samples" / ".recon_0000002.png.x3.tmp", run / "checkpoints" / ".previous.safetensors.link.tmp"]
    for path in torn:
        path.write_bytes(b"\0" * 1000)
    kept = run / ".notes.txt"  # a user's hidden file is not ours to delete
    kept.write_text("mine")
    train_autoencoder(tiny_run_config(max_steps=3), shapes_folder, run, device="cpu", progress=False)
    assert not any(path.exists() for path in torn) and kept.read_text() == "mine"
    assert not list(run.rglob("*.tmp"))
