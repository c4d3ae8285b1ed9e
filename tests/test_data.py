"""Image folders with captions (and corrupt files), and Fashion-MNIST's IDX files."""

import gzip
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.data import open_dataset
from latent_diffusion.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, caption_for, read_idx
from latent_diffusion.data.imagefolder import ImageFolder


def _write_folder(root):
    root.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "a.png")
    (root / "a.txt").write_text("a red thing\n")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "b.jpg")
    sub = root / "sub"
    sub.mkdir()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(sub / "c.webp")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.jpg", "text": "a blue thing"}) + "\n"
        + json.dumps({"file_name": "sub/c.webp", "text": "a green thing"}) + "\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_image_folder_reads_txt_and_metadata_captions_and_crops(tmp_path):
    ds = ImageFolder(_write_folder(tmp_path / "imgs"), resolution=16)
    items = {ds.files[i].name: ds[i] for i in range(len(ds)) if ds.files[i].name != "broken.png"}
    assert items["a.png"]["caption"] == "a red thing"
    assert items["b.jpg"]["caption"] == "a blue thing"
    assert items["c.webp"]["caption"] == "a green thing"
    for item in items.values():
        assert item["image"].shape == (3, 16, 16)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
    red = items["a.png"]["image"]
    assert torch.allclose(red[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    ds = ImageFolder(_write_folder(tmp_path / "imgs"), resolution=16)
    broken = [i for i, f in enumerate(ds.files) if f.name == "broken.png"][0]
    with caplog.at_level(logging.WARNING):
        item = ds[broken]
    assert item["image"].shape == (3, 16, 16)
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert sum(b["image"].shape[0] for b in loader) == len(ds)  # a whole epoch, no crash


def test_random_crop_and_flip_keep_the_size(tmp_path):
    ds = ImageFolder(_write_folder(tmp_path / "imgs"), resolution=12, random_crop=True, flip=True, channels=1)
    assert ds[0]["image"].shape == (1, 12, 12)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        open_dataset(tmp_path / "nope", 16, 3)


def _write_idx(path, array, magic_dims):
    header = (0x0800 | magic_dims).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_written_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 3)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 7, 8, 9, 3]), 1)
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
    _write_idx(path, np.zeros((4, 28, 28)), 3)
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
