"""Synthetic captioned shapes: a deterministic, seeded scene generator with structured attributes.

Spec: 64×64 RGB, one light background, 1–2 non-overlapping filled shapes in different cells of a 3×3 grid
(centroid ≥ 3 px inside its cell), caption `a {size} {colour} {shape} {position}` joined by ` and `.

The vocabulary the bundled models learnt is `COLOURS` × `SHAPES`, and it is what scenes use by default (byte for
byte the images of before). `NEW_COLOURS` and `NEW_SHAPES` are concepts those models never saw, for personalisation
experiments (LoRA, textual inversion): a scene draws them only when `colours=` / `shapes=` ask for them.
Cyan is far from every palette entry (≥ 150 in RGB) and from every blend of an old colour with a background or
another old colour, so the soft edges of old objects never read back as cyan (the bundled models' autoencoder
cannot draw it: cyan comes back blue, so teaching it takes more than a UNet adapter). The heart is a triangle upside
down (lobes on top, point at the bottom), which survives the blur of a 12 px object where finer shapes (star, plus,
diamond) turn into circles.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
CELL_MARGIN = 3
BACKGROUNDS = {"white": (255, 255, 255), "light gray": (225, 225, 225), "cream": (245, 238, 220)}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NEW_COLOURS = {"cyan": (0, 225, 240)}
NEW_SHAPES = ("heart",)
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
ALL_SHAPES = SHAPES + NEW_SHAPES
HEART_LOBE, HEART_JOIN = 0.65, 0.4  # lobe diameter, and height where lobes meet the point, as shares of the side
SIZES = {"small": 12, "large": 24}
POSITIONS = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its attributes, grid cell, pixel bounding box (inclusive) and mask centroid."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position}"


@dataclass(frozen=True)
class ShapeScene:
    """A whole image: background name and 1–2 objects."""

    background: str
    objects: tuple[ShapeObject, ...]

    @property
    def caption(self) -> str:
        return " and ".join(obj.phrase for obj in self.objects)

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}


def cell_bounds(index: int) -> tuple[float, float]:
    """[lo, hi] of grid row/column `index` in pixel coordinates (64 px split into thirds)."""
    return IMAGE_SIZE * index / 3, IMAGE_SIZE * (index + 1) / 3


def shape_mask(shape: str, side: int, x0: int = 0, y0: int = 0, canvas: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of a filled shape whose bounding box is `side` px with top-left corner (x0, y0)."""
    img = Image.new("L", (canvas, canvas), 0)
    _draw(ImageDraw.Draw(img), shape, x0, y0, side, 255)
    return np.asarray(img) > 0


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif shape == "heart":  # two round lobes on top of a downward point, mirror-symmetric
        lobe, join = round(side * HEART_LOBE) - 1, y0 + round(side * HEART_JOIN)
        draw.ellipse([x0, y0, x0 + lobe, y0 + lobe], fill=fill)
        draw.ellipse([x1 - lobe, y0, x1, y0 + lobe], fill=fill)
        draw.polygon([(x0, join), (x1, join), ((x0 + x1 + 1) // 2, y1), ((x0 + x1) // 2, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of a mask in continuous pixel coordinates (pixel i covers [i, i+1])."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


_CENTROID_OFFSETS: dict[tuple[str, int], tuple[float, float]] = {}


def _centroid_offset(shape: str, side: int) -> tuple[float, float]:
    key = (shape, side)
    if key not in _CENTROID_OFFSETS:
        _CENTROID_OFFSETS[key] = mask_centroid(shape_mask(shape, side, 0, 0, canvas=side))
    return _CENTROID_OFFSETS[key]


def _placement_range(cell: int, offset: float, side: int) -> tuple[int, int]:
    lo, hi = cell_bounds(cell)
    first = max(0, math.ceil(lo + CELL_MARGIN - offset))
    last = min(IMAGE_SIZE - side, math.floor(hi - CELL_MARGIN - offset))
    return first, last


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 1) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def vocabulary(colours: Iterable[str] | None = None, shapes: Iterable[str] | None = None
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (colours, shapes) a scene draws from: the bundled models' vocabulary where None, else the names given."""
    return (_names("colours", colours, tuple(COLOURS), tuple(ALL_COLOURS)),
            _names("shapes", shapes, SHAPES, ALL_SHAPES))


def _names(argument: str, given: Iterable[str] | None, default: tuple[str, ...],
           allowed: tuple[str, ...]) -> tuple[str, ...]:
    if given is None:
        return default
    names = (given,) if isinstance(given, str) else tuple(given)
    unknown = [n for n in names if n not in allowed]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"{argument} must be distinct names from {list(allowed)}, got {list(names)}")
    return names


def generate_scene(seed: int, index: int, colours: Iterable[str] | None = None,
                   shapes: Iterable[str] | None = None) -> ShapeScene:
    """Scene `index` of the set with `seed`; each (seed, index, colours, shapes) always gives the same scene.

    Every object takes its colour from `colours` and its shape from `shapes` (default: the bundled models'
    vocabulary, `COLOURS` and `SHAPES`); `shapes=["heart"]` makes a set where every object is a heart.
    """
    colours, shapes = vocabulary(colours, shapes)
    rng = np.random.default_rng([seed, index])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    count = int(rng.integers(1, 3))
    while True:
        cells = rng.choice(9, size=count, replace=False)
        objects: list[ShapeObject] = []
        for cell in cells:
            obj = _place_object(rng, int(cell) // 3, int(cell) % 3, [o.bbox for o in objects], colours, shapes)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == count:
            return ShapeScene(background, tuple(objects))


def _place_object(rng: np.random.Generator, row: int, col: int, taken: list[tuple[int, int, int, int]],
                  colours: tuple[str, ...], shapes: tuple[str, ...]) -> ShapeObject | None:
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    side = SIZES[size]
    dx, dy = _centroid_offset(shape, side)
    (x_first, x_last), (y_first, y_last) = _placement_range(col, dx, side), _placement_range(row, dy, side)
    for _ in range(20):
        x0, y0 = int(rng.integers(x_first, x_last + 1)), int(rng.integers(y_first, y_last + 1))
        bbox = (x0, y0, x0 + side - 1, y0 + side - 1)
        if all(_separated(bbox, other) for other in taken):
            return ShapeObject(shape, colour, size, row, col, bbox, (x0 + dx, y0 + dy))
    return None


def render_scene(scene: ShapeScene) -> Image.Image:
    """Draw a scene as a 64×64 RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, _ = obj.bbox
        _draw(draw, obj.shape, x0, y0, x1 - x0 + 1, ALL_COLOURS[obj.colour])
    return img


CONTROL_MAPS = ("mask", "edges")  # what `control_map` draws for a ControlNet
CONDITIONING_FOLDER = "conditioning"  # where a shapes folder keeps its control maps


def control_map(scene: ShapeScene, kind: str = "mask") -> Image.Image:
    """Where the scene's objects are, as a ControlNet reads it (RGB, white on black): "mask", their filled
    silhouettes; "edges", their one-pixel outlines."""
    if kind not in CONTROL_MAPS:
        raise ValueError(f"control map {kind!r}: expected one of {', '.join(CONTROL_MAPS)}")
    filled = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for obj in scene.objects:
        x0, y0, x1, _ = obj.bbox
        filled |= shape_mask(obj.shape, x1 - x0 + 1, x0, y0)
    if kind == "edges":  # pixels of a silhouette with a 4-neighbour outside it
        padded = np.pad(filled, 1)
        inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        filled &= ~inside
    return Image.fromarray(filled.astype(np.uint8) * 255).convert("RGB")


def parse_caption(caption: str) -> list[dict[str, str | int]]:
    """Structured attributes (size, colour, shape, row, col) of each object a caption asks for (new concepts
    included)."""
    objects = []
    phrase_to_cell = {p: (r, c) for r, row in enumerate(POSITIONS) for c, p in enumerate(row)}
    for phrase in caption.strip().split(" and "):
        words = phrase.split(" ", 4)
        if len(words) != 5 or words[0] != "a":
            raise ValueError(f"not a shapes caption phrase: {phrase!r}")
        _, size, colour, shape, position = words
        if size not in SIZES or colour not in ALL_COLOURS or shape not in ALL_SHAPES or position not in phrase_to_cell:
            raise ValueError(f"not a shapes caption phrase: {phrase!r}")
        row, col = phrase_to_cell[position]
        objects.append({"size": size, "colour": colour, "shape": shape, "row": row, "col": col})
    return objects


def write_shapes_folder(out: str | os.PathLike, count: int, seed: int = 0, progress: bool = True,
                        colours: Iterable[str] | None = None, shapes: Iterable[str] | None = None,
                        control: str | None = None) -> Path:
    """Write `count` scenes as PNGs plus a `metadata.jsonl` (file_name, text, scene attributes); gives the folder.

    `colours` / `shapes` restrict every object to those names (see `generate_scene`), e.g. `shapes=["heart"]`.
    `control` ("mask" or "edges") also writes each scene's control map to `conditioning/` and names it in the
    `conditioning_image` column (diffusers' ControlNet training layout).
    """
    if control is not None and control not in CONTROL_MAPS:
        raise ValueError(f"--control {control!r}: expected one of {', '.join(CONTROL_MAPS)}")
    from tqdm import tqdm

    from latent_diffusion.files.atomic import atomic_path

    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    colours, shapes = vocabulary(colours, shapes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(count - 1)))
    lines = []
    for i in tqdm(range(count), desc="shapes", disable=not progress):
        scene = generate_scene(seed, i, colours, shapes)
        name = f"{i:0{width}d}.png"
        render_scene(scene).save(out / name)
        record = {"file_name": name, "text": scene.caption, **scene.to_json()}
        if control is not None:
            (out / CONDITIONING_FOLDER).mkdir(exist_ok=True)
            control_map(scene, control).save(out / CONDITIONING_FOLDER / name)
            record["conditioning_image"] = f"{CONDITIONING_FOLDER}/{name}"
        lines.append(json.dumps(record))
    with atomic_path(out / "metadata.jsonl") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
