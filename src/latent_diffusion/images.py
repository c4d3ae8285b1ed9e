"""Conversions between tensors in [-1, 1] and images, and image grids written atomically."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFont, PngImagePlugin

from latent_diffusion.files.atomic import atomic_write_bytes


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 PIL image → float tensor (C, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (C, H, W) in [-1, 1] → uint8 PIL image (L or RGB)."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def make_grid(rows: list[torch.Tensor], pad: int = 2, scale: int = 1,
              captions: Sequence[str | Sequence[str]] | None = None) -> Image.Image:
    """One image from rows of batches (each (N, C, H, W) in [-1, 1]); `scale` enlarges small images; `captions`,
    one per row, are written under it: a string under the whole row, or a list with a string under each image."""
    n = max(r.shape[0] for r in rows)
    _, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = img.detach().float().cpu().clamp(-1, 1)
    image = tensor_to_pil(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    if captions is None:
        return image
    if len(captions) != len(rows):
        raise ValueError(f"make_grid: {len(captions)} captions for {len(rows)} rows")
    return _with_captions(image, captions, pad * scale, (h + pad) * scale, (w + pad) * scale)


def _with_captions(grid: Image.Image, captions: Sequence[str | Sequence[str]], pad: int, row_height: int,
                   cell_width: int) -> Image.Image:
    """`grid` cut after each row, with a strip holding that row's caption(s) inserted there."""
    font = ImageFont.load_default(size=min(24, max(12, row_height // 8)))
    bands = [grid.crop((0, 0, grid.width, pad))]
    for i, caption in enumerate(captions):
        top = pad + i * row_height
        bands.append(grid.crop((0, top, grid.width, top + row_height)))
        cells = [caption] if isinstance(caption, str) else list(caption)
        bands.append(_caption_strip(cells, grid.width - pad if isinstance(caption, str) else cell_width, pad,
                                    grid.width, grid.mode, font))
    out = Image.new(grid.mode, (grid.width, sum(band.height for band in bands)), "white")
    y = 0
    for band in bands:
        out.paste(band, (0, y))
        y += band.height
    return out


def _caption_strip(texts: list[str], cell_width: int, pad: int, width: int, mode: str,
                   font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """A white strip with `texts[j]` word-wrapped in cell j (cells `cell_width` apart, from `pad` on)."""
    lines = [_wrap(text, cell_width - 2 * pad, font) for text in texts]
    line_height = round(getattr(font, "size", 10) * 1.25)  # a bitmap font (Pillow without FreeType) has no size
    strip = Image.new(mode, (width, line_height * max(map(len, lines), default=0) + pad), "white")
    draw = ImageDraw.Draw(strip)
    for j, cell in enumerate(lines):
        for k, line in enumerate(cell):
            draw.text((pad + j * cell_width, k * line_height), line, fill="black", font=font)
    return strip


def _wrap(text: str, width: float, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """`text` broken at spaces into lines at most `width` pixels long (a longer word keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # what save_image writes
LOSSY_QUALITY = 90  # JPEG and WebP
_UNICODE = b"UNICODE\0"  # an EXIF UserComment's 8-byte code for UTF-16 text (big-endian here, as piexif writes it)
T = TypeVar("T")


def image_format(path: str | os.PathLike) -> str:
    """The format a file name's extension asks for: PNG, JPEG or WEBP."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{path}: unknown image format {suffix or '(no extension)'!r}; expected a name ending in "
                         f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_image(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> None:
    """Save atomically in the format of the extension (PNG, JPEG or WebP). `parameters` (generation settings as
    text) go where AUTOMATIC1111 puts them: a PNG's "parameters" text chunk, a JPEG's or WebP's EXIF UserComment."""
    fmt = image_format(path)
    options: dict = {}
    if fmt == "PNG" and parameters is not None:
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_text("parameters", parameters)
    elif fmt != "PNG":
        image = image if image.mode in ("L", "RGB") else image.convert("RGB")
        options["quality"] = LOSSY_QUALITY
        if parameters is not None:
            exif = Image.Exif()
            exif[ExifTags.IFD.Exif] = {ExifTags.Base.UserComment: _UNICODE + parameters.encode("utf-16-be")}
            options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    atomic_write_bytes(path, buffer.getvalue())


def read_parameters(path: str | os.PathLike) -> str | None:
    """The generation parameters an image file carries (as `save_image` and AUTOMATIC1111 write them), or None."""
    return _read_image(path, image_parameters)


def image_parameters(img: Image.Image) -> str | None:
    """The generation parameters of an opened image: a PNG's "parameters" text, a JPEG's or WebP's EXIF
    UserComment; None when it has neither."""
    if "parameters" in img.info:
        return str(img.info["parameters"])
    comment = img.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if not isinstance(comment, bytes) or len(comment) <= 8:
        return None
    code, text = comment[:8], comment[8:]
    return text.decode("utf-16-be" if code == _UNICODE else "latin-1", errors="replace").rstrip("\0")


def open_image(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """The image in a file, decoded, at 8 bits per channel (`to_8bit`: a 16-bit PNG keeps its tones) and in `mode`
    ("RGB", "L", ...) when given; a clear ValueError for an empty, undecodable or folder path."""
    return _read_image(path, functools.partial(_decoded, mode=mode))


def decode_image(data: bytes, name: str, mode: str | None = None) -> Image.Image:
    """`open_image` for an image file's bytes in memory (a tar member); `name` names it in the error."""
    return _decode(name, lambda: Image.open(io.BytesIO(data)), functools.partial(_decoded, mode=mode))


def _decoded(img: Image.Image, mode: str | None) -> Image.Image:
    img.load()
    image = to_8bit(img)
    return image.convert(mode) if mode else image.copy()


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` with 8 bits per channel: integer images (16-bit PNGs: I;16, I) scaled from 0-65535 to 0-255 ("L"),
    float images ("F") from 0-1 (clipped to 0-255 when they go beyond 1); palette, CMYK and other modes as RGB (RGBA
    with transparency); L, LA, RGB, RGBA and 1 as they are."""
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64) / 257
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = array * 255 if array.size and np.nanmax(array) <= 1.0 else array
    elif image.mode in ("1", "L", "LA", "RGB", "RGBA"):
        return image
    else:
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    return Image.fromarray(np.clip(np.nan_to_num(array).round(), 0, 255).astype(np.uint8))  # mode L


def _read_image(path: str | os.PathLike, read: Callable[[Image.Image], T]) -> T:
    """read(the opened image at `path`), with one clear error for whatever keeps it from being read."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not an image")
    return _decode(str(path), lambda: Image.open(path), read)


def _decode(name: str, opener: Callable[[], Image.Image], read: Callable[[Image.Image], T]) -> T:
    """read(opener()), whatever keeps the image from being decoded as one ValueError naming `name`."""
    try:
        with opener() as img:
            return read(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name} is not a readable image ({exc})") from exc
