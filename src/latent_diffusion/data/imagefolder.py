"""A folder of images with optional captions (`name.txt` beside each image, or `metadata.jsonl`)."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from latent_diffusion.images import open_image, pil_to_tensor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def resize_and_crop(img: Image.Image, resolution: int, random_crop: bool, rng: random.Random,
                    control: Image.Image | None = None
                    ) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """Scale the short side to `resolution`, then crop a square (centred or at random); a `control` map is resized
    (nearest neighbours: its regions keep their values) and cropped alike. Returns both (None without a control
    map) and the crop's top-left corner in the resized image (SDXL's crop micro-conditioning)."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if scale != 1:
        img = img.resize(size, Image.Resampling.BICUBIC)
    w, h = img.size
    left = rng.randint(0, w - resolution) if random_crop else (w - resolution) // 2
    top = rng.randint(0, h - resolution) if random_crop else (h - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    if control is None:
        return img.crop(box), None, (top, left)
    return img.crop(box), control.resize(img.size, Image.Resampling.NEAREST).crop(box), (top, left)


CAPTION_COLUMNS = ("text", "caption", "prompt")  # metadata.jsonl's caption column, as the ecosystem names it
CONTROL_COLUMN = "conditioning_image"  # a ControlNet's control map of the image (diffusers' train_controlnet.py)


def _read_text(path: Path) -> str:
    """A caption file's text, with an error naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: captions must be UTF-8 text ({exc.reason} at byte {exc.start}); re-save the "
                         "file as UTF-8") from None


def _caption_of(record: dict) -> str | None:
    """The caption in a metadata.jsonl record: its first column named as in `CAPTION_COLUMNS`, else None."""
    for column in CAPTION_COLUMNS:
        if column in record and record[column] is not None:
            return str(record[column]).strip()
    return None


def _metadata(root: Path) -> list[dict]:
    """The records of `root/metadata.jsonl` (none without one), each checked to name its file."""
    metadata, records = root / "metadata.jsonl", []
    if metadata.is_file():
        for number, line in enumerate(_read_text(metadata).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["file_name"] = str(record["file_name"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{metadata}:{number}: expected a JSON object with 'file_name' and a caption "
                                 f"column ({' / '.join(CAPTION_COLUMNS)}) ({exc})") from exc
            records.append(record)
    return records


def _read_controls(root: Path, records: list[dict]) -> dict[Path, Path]:
    """image → its control map, from metadata.jsonl's `conditioning_image` column."""
    return {(root / r["file_name"]).resolve(): (root / str(r[CONTROL_COLUMN])).resolve()
            for r in records if r.get(CONTROL_COLUMN)}


def _read_captions(root: Path, files: list[Path], records: list[dict]) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    for record in records:
        caption = _caption_of(record)
        if caption is not None:
            captions[(root / record["file_name"]).resolve()] = caption
    for path in files:
        txt = path.with_suffix(".txt")
        if txt.is_file():
            captions[path.resolve()] = _read_text(txt).strip()
    return captions


class ImageFolder(Dataset):
    """Images under `root` (recursively), each a dict {'image': (C, R, R) in [-1, 1], 'caption': str}.

    :param channels: 3 (RGB) or 1 (grayscale).
    :param random_crop: crop at a random place instead of the centre.
    :param flip: random horizontal flip with probability ½.
    :param captions: read the captions (`caption()` is "" for every image when False: the autoencoder's data).
    A file that cannot be decoded (or is a decompression bomb) is skipped with a warning naming it; the next image
    is returned instead.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3, random_crop: bool = False,
                 flip: bool = False, seed: int = 0, captions: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        records = _metadata(self.root)
        self.controls = _read_controls(self.root, records)  # image → its control map (ControlNet training)
        maps = set(self.controls.values())
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and p.resolve() not in maps)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}")
        self.captions = _read_captions(self.root, self.files, records) if captions else {}
        self.resolution, self.channels = resolution, channels
        self.random_crop, self.flip = random_crop, flip
        self.rng = random.Random(seed)
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        return self.captions.get(self.files[index].resolve(), "")

    def control(self, index: int) -> Image.Image | None:
        """The control map of image `index` (RGB), None when the folder has none; when the folder has control maps,
        an image without one is an error naming it."""
        controls = getattr(self, "controls", {})  # subclasses reading other sources have none
        if not controls:
            return None
        path = controls.get(self.files[index].resolve())
        if path is None:
            raise ValueError(f"{self.files[index]}: no control map ({CONTROL_COLUMN} in metadata.jsonl), while other "
                             "images of the folder have one")
        return open_image(path, "RGB")

    def load(self, index: int) -> Image.Image:
        """The image at `index`, decoded and converted, before cropping."""
        return open_image(self.files[index], "RGB" if self.channels == 3 else "L")

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if i in self.bad:
                continue
            try:
                img = self.load(i)
            except (OSError, ValueError) as exc:  # `open_image`'s errors name the file
                self.bad.add(i)
                log.warning("skipping an unreadable image: %s", exc)
                continue
            original = (img.height, img.width)
            img, control, crop = resize_and_crop(img, self.resolution, self.random_crop, self.rng, self.control(i))
            if self.flip and self.rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                control = None if control is None else control.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            item = {"image": pil_to_tensor(img), "caption": self.caption(i),
                    "original_size": torch.tensor(original), "crop": torch.tensor(crop)}
            return item if control is None else {**item, "control": (pil_to_tensor(control) + 1) / 2}
        raise ValueError(f"--data {self.root}: none of its {len(self.files)} images can be read (see the warnings "
                         "above for each file)")
