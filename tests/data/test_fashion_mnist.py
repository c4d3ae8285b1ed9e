"""Fashion-MNIST from its IDX files: read, padded to 32 with a caption per class, truncated files named."""

import gzip

import numpy as np
import pytest
import torch

from latent_diffusion.data import open_dataset
from latent_diffusion.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, caption_for, read_idx

from conftest import write_idx


def test_fashion_mnist_reader_on_written_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 7, 8, 9, 3]))
    ds = open_dataset(tmp_path, resolution=32, channels=3)
    assert isinstance(ds, FashionMNIST) and len(ds) == 6
    item = ds[2]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 7
    assert item["caption"] == "a photo of a sneaker"
    assert torch.allclose(item["image"][0, 2:30, 2:30], torch.from_numpy(images[2] / 127.5 - 1).float(), atol=1e-6)
    assert (item["image"][:, :2] == -1).all()
    assert caption_for(9) == "a photo of an ankle boot"


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((4, 28, 28)))
    data = gzip.decompress(path.read_bytes())[:-10]
    path.write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(np.bincount(test.labels).tolist()) == [1000] * 10
    item = test[0]
    assert item["image"].shape == (1, 32, 32) and item["caption"] == caption_for(item["label"])
