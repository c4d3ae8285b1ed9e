"""A dataset encoded once by the frozen autoencoder: posterior moments on disk, reused until the inputs change."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.io.checkpoint import CheckpointError, load_weights, read_metadata, save_weights

log = logging.getLogger(__name__)

CACHE_FILE = "latents.safetensors"


class LatentCache:
    """Posterior means/stds of every image, with its caption and label; fresh z ~ q(z|x) drawn per use.

    `images` (uint8, N×C×H×W) is kept too when training needs the pixels (spatial conditions).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str], labels: list[int],
                 images: torch.Tensor | None = None):
        self.mean, self.std, self.captions, self.labels, self.images = mean, std, captions, labels, images

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε for the given images (unscaled latents)."""
        mean, std = self.mean[indices], self.std[indices]
        return mean + std * torch.randn(mean.shape, generator=generator)

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """The images in [-1, 1] (float); only for a cache encoded with `keep_images`."""
        if self.images is None:
            raise RuntimeError("this latent cache keeps no images (encode it with keep_images=True)")
        return self.images[indices].float() / 127.5 - 1

    def items(self, indices: torch.Tensor) -> list[dict]:
        return [{"caption": self.captions[i], "label": self.labels[i]} for i in indices.tolist()]

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Index batches forever; epoch e is a permutation seeded by seed + e, so a resumed run continues."""
        per_epoch = len(self) // batch_size
        epoch, skip = divmod(start_step, per_epoch)
        while True:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch))
            for b in range(skip, per_epoch):
                yield order[b * batch_size:(b + 1) * batch_size]
            epoch, skip = epoch + 1, 0


def fingerprint(autoencoder: AutoencoderKL, dataset: Dataset, keep_images: bool = False) -> str:
    """Identity of (autoencoder weights, dataset contents): a changed input invalidates the cache."""
    digest = hashlib.sha256(b"images" if keep_images else b"")
    for key, value in sorted(autoencoder.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    digest.update(type(dataset).__name__.encode())
    digest.update(str(len(dataset)).encode())
    for attr in ("files", "resolution", "channels", "random_crop"):
        digest.update(repr(getattr(dataset, attr, None)).encode())
    if hasattr(dataset, "images"):
        digest.update(hashlib.sha256(dataset.images.tobytes()).digest())
    return digest.hexdigest()


@torch.no_grad()
def encode_dataset(autoencoder: AutoencoderKL, dataset: Dataset, cache_dir: Path, batch_size: int = 64,
                   progress: bool = True, keep_images: bool = False) -> LatentCache:
    """Load the cache in `cache_dir` if it matches, else encode `dataset` and write it (atomically)."""
    path = Path(cache_dir) / CACHE_FILE
    key = fingerprint(autoencoder, dataset, keep_images)
    if path.is_file():
        try:
            meta = read_metadata(path)
            if meta.get("fingerprint") == key:
                tensors = load_weights(path)
                return LatentCache(tensors["mean"], tensors["std"], json.loads(meta["captions"]),
                                   json.loads(meta["labels"]), tensors.get("images"))
            log.info("latent cache %s is stale (autoencoder or data changed): re-encoding", path)
        except CheckpointError as exc:
            log.warning("latent cache unreadable, re-encoding: %s", exc)
    device = next(autoencoder.parameters()).device
    means, stds, captions, labels, images = [], [], [], [], []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="encode latents", disable=not progress):
        posterior = autoencoder.encode(batch["image"].to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        if keep_images:
            images.append(((batch["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        captions += list(batch["caption"])
        labels += batch["label"].tolist() if "label" in batch else [-1] * len(batch["image"])
    cache = LatentCache(torch.cat(means), torch.cat(stds), captions, labels,
                        torch.cat(images) if keep_images else None)
    tensors = {"mean": cache.mean, "std": cache.std, **({"images": cache.images} if keep_images else {})}
    save_weights(tensors, path,
                 metadata={"fingerprint": key, "captions": json.dumps(captions), "labels": json.dumps(labels)})
    return cache
