"""The synthetic shapes generator follows its spec exactly, measured on the rendered pixels."""

import json

import numpy as np
import pytest

from latent_diffusion.cli import main
from latent_diffusion.data.shapes import (BACKGROUNDS, CELL_MARGIN, COLOURS, IMAGE_SIZE, POSITIONS, SIZES,
                                          cell_bounds, generate_scene, mask_centroid, parse_caption, render_scene)

SCENES = [(seed, index) for seed in range(4) for index in range(60)]


def _object_mask(pixels: np.ndarray, colour: str, bbox) -> np.ndarray:
    mask = np.all(pixels == COLOURS[colour], axis=-1)
    x0, y0, x1, y1 = bbox
    region = np.zeros_like(mask)
    region[max(0, y0 - 1):y1 + 2, max(0, x0 - 1):x1 + 2] = True
    return mask & region


@pytest.mark.parametrize("seed,index", SCENES[::3])
def test_rendered_scene_follows_spec(seed, index):
    scene = generate_scene(seed, index)
    pixels = np.asarray(render_scene(scene))
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert 1 <= len(scene.objects) <= 2
    background = np.array(BACKGROUNDS[scene.background])
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    allowed = {tuple(background)} | {COLOURS[o.colour] for o in scene.objects}
    assert colours <= allowed, "no anti-aliasing, no stray colours"
    assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects), "objects share a cell"
    union = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=int)
    for obj in scene.objects:
        mask = _object_mask(pixels, obj.colour, obj.bbox)
        ys, xs = np.nonzero(mask)
        side = SIZES[obj.size]
        assert abs((xs.max() - xs.min() + 1) - side) <= 1 and abs((ys.max() - ys.min() + 1) - side) <= 1
        cx, cy = mask_centroid(mask)
        (xlo, xhi), (ylo, yhi) = cell_bounds(obj.col), cell_bounds(obj.row)
        assert xlo + CELL_MARGIN <= cx <= xhi - CELL_MARGIN and ylo + CELL_MARGIN <= cy <= yhi - CELL_MARGIN
        union += mask
    assert union.max() <= 1, "objects overlap"
    expected = " and ".join(f"a {o.size} {o.colour} {o.shape} {POSITIONS[o.row][o.col]}" for o in scene.objects)
    assert scene.caption == expected


def test_shapes_are_recognisable_by_fill_ratio():
    """circle ≈ π/4, square = 1, triangle ≈ 1/2 of the bounding box; triangles are wider at the bottom."""
    ratios = {"circle": [], "square": [], "triangle": []}
    for seed, index in SCENES:
        scene = generate_scene(seed, index)
        pixels = np.asarray(render_scene(scene))
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            mask = _object_mask(pixels, obj.colour, obj.bbox)[y0:y1 + 1, x0:x1 + 1]
            ratios[obj.shape].append(mask.mean())
            if obj.shape == "triangle":
                assert mask[-1].sum() > mask[1].sum(), "triangle is upright, base at the bottom"
    assert all(len(r) > 10 for r in ratios.values())
    assert np.mean(ratios["square"]) == pytest.approx(1.0)
    assert np.mean(ratios["circle"]) == pytest.approx(np.pi / 4, abs=0.06)
    assert np.mean(ratios["triangle"]) == pytest.approx(0.5, abs=0.08)


def test_generator_is_deterministic_and_covers_the_vocabulary():
    assert generate_scene(7, 11) == generate_scene(7, 11)
    assert generate_scene(7, 11) != generate_scene(8, 11)
    scenes = [generate_scene(0, i) for i in range(400)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS)
    assert {(o.row, o.col) for o in objects} == {(r, c) for r in range(3) for c in range(3)}
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def test_caption_parses_back_to_attributes():
    for i in range(50):
        scene = generate_scene(1, i)
        parsed = parse_caption(scene.caption)
        assert parsed == [{"size": o.size, "colour": o.colour, "shape": o.shape, "row": o.row, "col": o.col}
                          for o in scene.objects]
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a huge pink hexagon in the middle")


def test_make_shapes_cli_writes_an_image_folder(tmp_path, capsys):
    assert main(["make-shapes", str(tmp_path / "out"), "--count", "5", "--seed", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == [f"{i:05d}.png" for i in range(5)]
    assert records[3]["text"] == generate_scene(2, 3).caption
    assert records[3]["objects"][0]["shape"] == generate_scene(2, 3).objects[0].shape
    assert (tmp_path / "out" / "00004.png").is_file()
