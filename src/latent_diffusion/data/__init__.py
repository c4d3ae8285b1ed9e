"""Datasets: image folders with captions, Fashion-MNIST, synthetic captioned shapes."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from latent_diffusion.data.fashion_mnist import FashionMNIST, is_fashion_mnist_dir
from latent_diffusion.data.imagefolder import ImageFolder
from latent_diffusion.data.webdataset import TarShards, is_shard_folder

FASHION_MNIST = "fashion-mnist"


def open_dataset(spec: str | os.PathLike, resolution: int, channels: int, split: str = "train",
                 random_crop: bool = False, flip: bool = False, seed: int = 0, captions: bool = True) -> Dataset:
    """A dataset from a command-line spec.

    `spec` is an image folder, a folder of WebDataset tar shards, a folder holding Fashion-MNIST's IDX files, or
    `fashion-mnist`
    (the Debian package's copy). `split` picks Fashion-MNIST's train/test split; `captions=False` reads no
    caption files (image-only training).
    """
    if channels not in (1, 3):
        raise ValueError(f"model.in_channels = {channels}: image data has 1 (grayscale) or 3 (RGB) channels")
    spec_str = str(spec)
    if spec_str == FASHION_MNIST:
        return FashionMNIST(None, split, resolution, channels, flip, seed)
    path = Path(spec_str)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec_str}: no such folder (expected an image folder, a Fashion-MNIST "
                                f"IDX folder, or '{FASHION_MNIST}')")
    if is_fashion_mnist_dir(path):
        return FashionMNIST(path, split, resolution, channels, flip, seed)
    if is_shard_folder(path):
        return TarShards(path, resolution, channels, random_crop, flip, seed, captions)
    return ImageFolder(path, resolution, channels, random_crop, flip, seed, captions)


def count_captioned(dataset: Dataset) -> int:
    """How many items of `dataset` have a non-empty caption (read from the index: no image is decoded)."""
    if isinstance(dataset, FashionMNIST):  # a caption per label
        return len(dataset)
    return sum(1 for i in range(len(dataset)) if dataset.caption(i).strip())


__all__ = ["FashionMNIST", "ImageFolder", "TarShards", "count_captioned", "open_dataset"]
