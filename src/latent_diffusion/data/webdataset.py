"""WebDataset-format tar shards (the LAION-scale convention): `000000.tar` holding `key.jpg` + `key.txt` pairs.

The shards are indexed once (tar headers only) and read in place: each sample is one seek and one read in its
shard, with no extraction, so any rank or worker can read any sample of any shard.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

from PIL import Image

from latent_diffusion.data.imagefolder import IMAGE_EXTENSIONS, ImageFolder
from latent_diffusion.images import decode_image


def is_shard_folder(path: Path) -> bool:
    """A folder whose data are `.tar` shards (and no loose images)."""
    return path.is_dir() and any(path.glob("*.tar"))


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the first dot of the file's base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def index_shard(shard: Path) -> list[dict]:
    """The samples of one shard, in order: {'key', 'offset', 'size', 'caption'} (image data located, not read)."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                sample = samples.setdefault(key, {"key": key})
                if ext in IMAGE_EXTENSIONS:
                    sample.update(offset=member.offset_data, size=member.size)
                elif ext == ".txt":
                    sample["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot read shard {shard}: {exc} (truncated or not a tar file?)") from exc
    return [{"caption": "", **s} for s in samples.values() if "offset" in s]


class TarShards(ImageFolder):
    """The samples of every `*.tar` shard under `root` (sorted by name); the same items as `ImageFolder` would give
    for the same images and captions, so training on shards equals training on the folder."""

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3, random_crop: bool = False,
                 flip: bool = False, seed: int = 0, captions: bool = True):
        self.root = Path(root)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.shards = sorted(self.root.glob("*.tar"))
        if not self.shards:
            raise ValueError(f"no .tar shards found in {self.root}")
        self.samples = [(shard, s) for shard in self.shards for s in index_shard(shard)]
        if not self.samples:
            raise ValueError(f"the shards in {self.root} hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = [Path(f"{shard}#{s['key']}") for shard, s in self.samples]  # names for messages and cache keys
        self.resolution, self.channels = resolution, channels
        self.random_crop, self.flip = random_crop, flip
        self.rng = random.Random(seed)
        self.bad: set[int] = set()
        self.read_captions = captions

    def caption(self, index: int) -> str:
        return self.samples[index][1]["caption"] if self.read_captions else ""

    def load(self, index: int) -> Image.Image:
        shard, sample = self.samples[index]
        with open(shard, "rb") as f:
            f.seek(sample["offset"])
            data = f.read(sample["size"])
        return decode_image(data, str(self.files[index]), "RGB" if self.channels == 3 else "L")


def write_shards(samples: list[tuple[str, bytes, str]], folder: str | os.PathLike, per_shard: int = 1000,
                 image_ext: str = ".png") -> list[Path]:
    """Write (key, image bytes, caption) samples as `000000.tar`, `000001.tar` ...; returns the shard paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"{number:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, caption in samples[start:start + per_shard]:
                for ext, data in ((image_ext, image), (".txt", caption.encode("utf-8"))):
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
