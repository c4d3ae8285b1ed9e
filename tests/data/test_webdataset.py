"""WebDataset tar shards: the same items as the image folder they were packed from, and the same training."""

import pytest
import torch

from latent_diffusion.data import ImageFolder, TarShards, open_dataset
from latent_diffusion.data.webdataset import write_shards
from latent_diffusion.files.weights import load_weights
from latent_diffusion.training.autoencoder import train_autoencoder

from conftest import tiny_run_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shapes_folder):
    folder = ImageFolder(shapes_folder, resolution=32)
    samples = [(path.stem, path.read_bytes(), folder.caption(i)) for i, path in enumerate(folder.files)]
    out = tmp_path_factory.mktemp("shards")
    assert [p.name for p in write_shards(samples, out, per_shard=10)] == ["000000.tar", "000001.tar", "000002.tar"]
    return out


def test_shards_hold_the_same_items_as_the_folder(shards, shapes_folder):
    folder, tars = ImageFolder(shapes_folder, resolution=32), open_dataset(shards, 32, 3)
    assert isinstance(tars, TarShards) and len(tars) == len(folder) == 24
    for i in range(len(folder)):
        assert tars.caption(i) == folder.caption(i) and tars.caption(i).startswith("a ")
        assert torch.equal(tars[i]["image"], folder[i]["image"])


def test_training_on_shards_equals_training_on_the_folder(tmp_path, shards, shapes_folder):
    for name, data in (("folder", shapes_folder), ("shards", shards)):
        train_autoencoder(tiny_run_config(max_steps=3), data, tmp_path / name, device="cpu", progress=False)
    a = load_weights(tmp_path / "folder" / "autoencoder.safetensors")
    b = load_weights(tmp_path / "shards" / "autoencoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_truncated_shard_is_a_clear_error(tmp_path, shards):
    (tmp_path / "000000.tar").write_bytes((shards / "000000.tar").read_bytes()[:700])
    with pytest.raises(ValueError, match="cannot read shard .*000000.tar"):
        TarShards(tmp_path, 32)
