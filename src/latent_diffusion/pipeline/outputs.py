"""Where generated images go: one file per image, named so that nothing of one run overwrites another of its files,
every name checked before any work, and a grid of them.

`-o out.png` with N images: out.png, out-1.png, …, out-{N-1}.png (image k is seed + k) and out-grid.png; with a
list of prompts, prompt p's are out-0000.png, out-0000-1.png, … and out-0000-grid.png (p from 0, four digits or
more). A folder (a path ending in '/', or an existing folder) holds the same names with the stem "out" (PNG).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from latent_diffusion.files.atomic import check_writable as check_file_writable
from latent_diffusion.images import IMAGE_FORMATS, image_format, make_grid, pil_to_tensor, save_image

DEFAULT_NAME = "out.png"


def output_file(output: str | os.PathLike) -> Path:
    """The file an output path names: itself, or out.png inside it when it is a folder (a path ending in '/', or an
    existing folder whose name has no image extension); its format checked."""
    text = os.fspath(output)
    path = Path(text)
    if text.endswith(("/", os.sep)) or (path.is_dir() and path.suffix.lower() not in IMAGE_FORMATS):
        path = path / DEFAULT_NAME
    image_format(path)
    return path


def image_paths(output: Path, num_images: int, prompt: int | None = None, num_prompts: int = 1) -> list[Path]:
    """The file of each image of one prompt (`prompt`: its index in a list of `num_prompts`; None for one)."""
    stem = _stem(output, prompt, num_prompts)
    return [output.with_name(f"{stem}{f'-{k}' if k else ''}{output.suffix}") for k in range(num_images)]


def grid_path(output: Path, prompt: int | None = None, num_prompts: int = 1) -> Path:
    """The file of one prompt's grid."""
    return output.with_name(f"{_stem(output, prompt, num_prompts)}-grid{output.suffix}")


def _stem(output: Path, prompt: int | None, num_prompts: int) -> str:
    return output.stem if prompt is None else f"{output.stem}-{prompt:0{max(4, len(str(num_prompts - 1)))}d}"


def plan_outputs(output: str | os.PathLike, num_prompts: int, num_images: int,
                 grid: bool) -> list[tuple[list[Path], Path | None]]:
    """(image files, grid file or None) of each prompt, every one checked writable."""
    file = output_file(output)
    indices = [None] if num_prompts == 1 else range(num_prompts)
    plan = [(image_paths(file, num_images, p, num_prompts), grid_path(file, p, num_prompts) if grid else None)
            for p in indices]
    check_writable([path for paths, grid_file in plan for path in [*paths, grid_file] if path is not None])
    return plan


def check_writable(paths: list[Path]) -> None:
    """That each file can be written: no folder in its way, inside a folder (or under one that can be made) we may
    write in; an OSError naming the file otherwise."""
    for path in paths:
        check_file_writable(path, "-o")


def grid_image(images: list[Image.Image]) -> Image.Image:
    """The images in a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    tensors = torch.stack([pil_to_tensor(image) for image in images])
    return make_grid([tensors[i:i + cols] for i in range(0, len(images), cols)])


def check_grid(num_images: int, height: int, width: int) -> None:
    """That a grid of these images stays within what image viewers open (PIL's MAX_IMAGE_PIXELS)."""
    if num_images * height * width > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"a grid of {num_images} images of {width}x{height} would have "
                         f"{num_images * height * width / 1e6:.0f} megapixels (viewers refuse more than "
                         f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f}): leave out the grid or ask for fewer images")


def write_images(pipe, prompt: str, paths: list[Path], grid: Path | None, seed: int, batch_size: int,
                 parameters: Callable[[int], str | None], **options) -> None:
    """Draw `prompt` len(paths) times in batches of `batch_size` (image k with seed + k) and write each image to its
    path with `parameters(its seed)` as its batch ends, then the grid of them; `options` go to `pipe(...)`."""
    drawn: list[Image.Image] = []
    for start in range(0, len(paths), batch_size):
        count = min(batch_size, len(paths) - start)
        for k, image in enumerate(pipe(prompt, seed=seed + start, num_images=count, **options), start):
            save_image(image, paths[k], parameters(seed + k))
            drawn += [image] if grid is not None else []
    if grid is not None:
        save_image(grid_image(drawn), grid)
