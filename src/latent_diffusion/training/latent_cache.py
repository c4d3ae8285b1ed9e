"""A dataset encoded once by the frozen autoencoder: posterior moments on disk, reused until the inputs change."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.files.weights import CheckpointError, load_weights, read_metadata, save_weights

log = logging.getLogger(__name__)

CACHE_FILE = "latents.safetensors"


class LatentCache:
    """Posterior means/stds of every image, with its caption and label; fresh z ~ q(z|x) drawn per use.

    `images` (uint8, N×C×H×W) is kept too when training needs the pixels (spatial conditions); `controls` (uint8,
    N×3×H×W) when the dataset has control maps (ControlNet training).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str], labels: list[int],
                 images: torch.Tensor | None = None, controls: torch.Tensor | None = None,
                 geometry: torch.Tensor | None = None):
        self.mean, self.std, self.captions, self.labels, self.images = mean, std, captions, labels, images
        self.controls, self.geometry = controls, geometry

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

    def control_maps(self, indices: torch.Tensor) -> torch.Tensor:
        """The control maps in [0, 1] (float) of the given images."""
        if self.controls is None:
            raise RuntimeError("this latent cache keeps no control maps (its dataset has none)")
        return self.controls[indices].float() / 255

    def items(self, indices: torch.Tensor) -> list[dict]:
        """Each image's caption, label and geometry: its size, its original size and the crop's top-left corner
        (SDXL's micro-conditioning; a dataset that does not say is taken as uncropped at the training size)."""
        rows = []
        for i in indices.tolist():
            h, w, *rest = self.geometry[i].tolist() if self.geometry is not None else [0, 0]
            size = (h, w) if h else None
            rows.append({"caption": self.captions[i], "label": self.labels[i], "size": size,
                         "original_size": tuple(rest[:2]) if rest else size, "crop": tuple(rest[2:]) or (0, 0)})
        return rows


def fingerprint(autoencoder: AutoencoderKL, dataset: Dataset, keep_images: bool = False) -> str:
    """Identity of (autoencoder weights, dataset contents): a changed input invalidates the cache."""
    digest = hashlib.sha256(b"images" if keep_images else b"")
    digest.update(b"geometry")  # caches from before the images' geometry was kept are encoded again
    for key, value in sorted(autoencoder.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    digest.update(type(dataset).__name__.encode())
    digest.update(str(len(dataset)).encode())
    for attr in ("files", "resolution", "channels", "random_crop", "controls"):
        digest.update(repr(getattr(dataset, attr, None)).encode())
    if hasattr(dataset, "images"):
        digest.update(hashlib.sha256(dataset.images.tobytes()).digest())
    return digest.hexdigest()


def shard_paths(cache_dir: Path, world_size: int) -> list[Path]:
    """The cache files: one for a single process, one per rank-shard of the dataset under torchrun."""
    if world_size == 1:
        return [Path(cache_dir) / CACHE_FILE]
    return [Path(cache_dir) / f"latents-{r:05d}-of-{world_size:05d}.safetensors" for r in range(world_size)]


def _read_cache(path: Path, key: str) -> LatentCache | None:
    """The cache stored in `path` if it is readable and was made from the same inputs, else None."""
    if not path.is_file():
        return None
    try:
        meta = read_metadata(path)
        if meta.get("fingerprint") != key:
            log.info("latent cache %s is stale (autoencoder or data changed): re-encoding", path)
            return None
        tensors = load_weights(path)
    except CheckpointError as exc:
        log.warning("latent cache unreadable, re-encoding: %s", exc)
        return None
    return LatentCache(tensors["mean"], tensors["std"], json.loads(meta["captions"]), json.loads(meta["labels"]),
                       tensors.get("images"), tensors.get("controls"), tensors.get("geometry"))


def _join(parts: list[LatentCache]) -> LatentCache:
    images, controls, geometry = ([getattr(p, name) for p in parts] for name in ("images", "controls", "geometry"))
    return LatentCache(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]),
                       [c for p in parts for c in p.captions], [label for p in parts for label in p.labels],
                       None if images[0] is None else torch.cat(images),
                       None if controls[0] is None else torch.cat(controls),
                       None if any(g is None for g in geometry) else torch.cat(geometry))


@torch.no_grad()
def encode_dataset(autoencoder: AutoencoderKL, dataset: Dataset, cache_dir: Path, batch_size: int = 64,
                   progress: bool = True, keep_images: bool = False, ctx=None, signals=None,
                   num_workers: int = 0) -> LatentCache:
    """Load the cache in `cache_dir` if it matches, else encode `dataset` and write it (atomically).

    Under torchrun (`ctx` a `DistributedContext`) each rank encodes its contiguous shard of the dataset into its
    own file once; then every rank reads all shards. A stop signal (`signals`, a `StopSignals`) ends the encoding
    after the current batch: what was encoded is kept, and the next run continues from there. `num_workers`
    processes load the images.
    """
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    key = fingerprint(autoencoder, dataset, keep_images)
    paths = shard_paths(cache_dir, world)
    n = len(dataset)
    mine = _read_cache(paths[rank], key)
    if mine is None:
        shard = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
        mine = _encode(autoencoder, shard, paths[rank], key, batch_size, progress, keep_images, signals, num_workers)
    if ctx is not None:
        ctx.barrier()
    parts = [mine if r == rank else _read_cache(path, key) for r, path in enumerate(paths)]
    if any(part is None for part in parts):
        raise CheckpointError(f"latent cache shards in {cache_dir} are missing or unreadable after encoding")
    return parts[0] if world == 1 else _join(parts)


def partial_path(path: Path) -> Path:
    """Where the images encoded so far are kept when encoding into `path` was stopped."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _encode(autoencoder: AutoencoderKL, dataset: Dataset, path: Path, key: str, batch_size: int, progress: bool,
            keep_images: bool, signals=None, num_workers: int = 0) -> LatentCache:
    """Encode `dataset` (continuing a stopped encoding), write its cache file to `path` and return it."""
    device = next(itertools.chain(autoencoder.parameters(), autoencoder.buffers())).device
    done = _read_cache(partial_path(path), key)
    parts = [done] if done is not None else []
    start = len(done) if done is not None else 0
    if start:
        log.info("continuing the latent cache from image %d of %d", start, len(dataset))
    loader = DataLoader(Subset(dataset, range(start, len(dataset))), batch_size=batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc="encode latents", disable=not progress, initial=start // batch_size,
                      total=-(-len(dataset) // batch_size)):
        if signals is not None and signals.requested is not None:
            if parts:
                _write(_join(parts), partial_path(path), key)
            signals.check()
        posterior = autoencoder.encode(batch["image"].to(device))
        labels = batch["label"].tolist() if "label" in batch else [-1] * len(batch["image"])
        images = ((batch["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) if keep_images else None
        controls = (batch["control"] * 255).round().clamp(0, 255).to(torch.uint8) if "control" in batch else None
        parts.append(LatentCache(posterior.mean.float().cpu(), posterior.std.float().cpu(), list(batch["caption"]),
                                 labels, images, controls, _geometry(batch)))
    cache = _join(parts)
    _write(cache, path, key)
    partial_path(path).unlink(missing_ok=True)
    return cache


def _geometry(batch: dict) -> torch.Tensor:
    """(B, 6) int: each image's height and width, then its original size and crop corner where the dataset gives
    them (image folders), else only the size."""
    n, (h, w) = len(batch["image"]), batch["image"].shape[-2:]
    size = torch.tensor([[h, w]]).expand(n, 2)
    if "original_size" not in batch:
        return torch.cat([size, size, torch.zeros(n, 2, dtype=torch.long)], dim=1)
    return torch.cat([size, batch["original_size"].long(), batch["crop"].long()], dim=1)


def _write(cache: LatentCache, path: Path, key: str) -> None:
    """Store `cache` in `path` (atomically), keyed by the fingerprint of its inputs."""
    tensors = {"mean": cache.mean, "std": cache.std,
               **{name: t for name, t in (("images", cache.images), ("controls", cache.controls),
                                          ("geometry", cache.geometry)) if t is not None}}
    save_weights(tensors, path, metadata={"fingerprint": key, "captions": json.dumps(cache.captions),
                                          "labels": json.dumps(cache.labels)})
