"""Fashion-MNIST (Xiao et al. 2017) read from its IDX files: 28×28 photos padded to 32×32, 10 classes."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package `dataset-fashion-mnist`
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPLITS = {"train": "train", "test": "t10k"}


def caption_for(label: int) -> str:
    """`a photo of a {class name}` ("an" before a vowel)."""
    name = CLASS_NAMES[label]
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def find_idx_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root} "
                            "(install the Debian package dataset-fashion-mnist, or pass the folder of the IDX files)")


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (magic, dims, big-endian uint8 payload)."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {payload.size} bytes (truncated?)")
    return payload.reshape(shape)


def is_fashion_mnist_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return any((path / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz"))


class FashionMNIST(Dataset):
    """Items {'image': (C, 32, 32) in [-1, 1], 'caption': str, 'label': int}.

    :param split: 'train' (60k) or 'test' (10k).
    :param channels: 1 (as stored) or 3 (grey repeated).
    :param resolution: output size; 28×28 images are zero-padded (black, the data's background) to it.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", resolution: int = 32,
                 channels: int = 1, flip: bool = False, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if resolution < 28:
            raise ValueError(f"resolution must be >= 28 for Fashion-MNIST, got {resolution}")
        root = Path(root) if root is not None else DEFAULT_ROOT
        prefix = SPLITS[split]
        self.images = read_idx(find_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        self.labels = read_idx(find_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{root}: {len(self.images)} images but {len(self.labels)} labels")
        self.resolution, self.channels, self.flip = resolution, channels, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = torch.from_numpy(self.images[index].astype(np.float32)) / 127.5 - 1.0
        pad = self.resolution - image.shape[0]
        image = torch.nn.functional.pad(image, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
        if self.flip and torch.rand((), generator=self.generator) < 0.5:
            image = image.flip(-1)
        image = image.unsqueeze(0).expand(self.channels, -1, -1).contiguous()
        label = int(self.labels[index])
        return {"image": image, "caption": caption_for(label), "label": label}
