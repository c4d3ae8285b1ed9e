"""The synthetic shapes generator follows its spec exactly, measured on the rendered pixels."""

import hashlib
import json

import numpy as np
import pytest

from latent_diffusion.cli import main
from latent_diffusion.data.shapes import (ALL_COLOURS, BACKGROUNDS, CELL_MARGIN, COLOURS, IMAGE_SIZE, NEW_COLOURS,
                                          NEW_SHAPES, POSITIONS, SHAPES, SIZES, cell_bounds, generate_scene,
                                          mask_centroid, parse_caption, render_scene, shape_mask,
                                          write_shapes_folder)

SCENES = [(seed, index) for seed in range(4) for index in range(60)]
# Scenes drawn only from the new concepts, or from them mixed with the old vocabulary
CONCEPT_VOCABULARIES = [(list(NEW_COLOURS), None), (None, list(NEW_SHAPES)), (list(NEW_COLOURS) + ["red"], ["heart"])]


def _object_mask(pixels: np.ndarray, colour: str, bbox) -> np.ndarray:
    mask = np.all(pixels == ALL_COLOURS[colour], axis=-1)
    x0, y0, x1, y1 = bbox
    region = np.zeros_like(mask)
    region[max(0, y0 - 1):y1 + 2, max(0, x0 - 1):x1 + 2] = True
    return mask & region


@pytest.mark.parametrize("seed,index,colours,shapes", [(s, i, None, None) for s, i in SCENES[::3]]
                         + [(s, i, c, sh) for c, sh in CONCEPT_VOCABULARIES for s, i in SCENES[:60:6]])
def test_rendered_scene_follows_spec(seed, index, colours, shapes):
    scene = generate_scene(seed, index, colours, shapes)
    pixels = np.asarray(render_scene(scene))
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert 1 <= len(scene.objects) <= 2
    background = np.array(BACKGROUNDS[scene.background])
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    allowed = {tuple(background)} | {ALL_COLOURS[o.colour] for o in scene.objects}
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


def test_default_scenes_are_byte_identical_to_those_the_bundled_models_learnt_from():
    """Digests taken before the new concepts existed: pixels, captions and attributes, and a folder's metadata."""
    digest = hashlib.sha256()
    for seed in (0, 3, 7):
        for i in range(12):
            scene = generate_scene(seed, i)
            digest.update(np.asarray(render_scene(scene)).tobytes())
            digest.update(json.dumps({"text": scene.caption, **scene.to_json()}).encode())
    assert digest.hexdigest() == "815ffde43f2865db8ee6608e63041b63881d775ea4a64e0e34fdaf4b2a08b349"
    assert generate_scene(5, 9, list(COLOURS), SHAPES) == generate_scene(5, 9)


def test_default_folder_metadata_is_unchanged(tmp_path):
    out = write_shapes_folder(tmp_path / "x", 6, seed=2, progress=False)
    assert hashlib.sha256((out / "metadata.jsonl").read_bytes()).hexdigest() == \
        "b69a12376464d313135cb31d6c3c309fb6fe7642c194da9672f3071363415aa9"


def test_restricted_vocabulary_puts_the_concept_in_every_object():
    scenes = [generate_scene(0, i, colours=["cyan"], shapes=["heart", "square"]) for i in range(100)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == {"cyan"} and {o.shape for o in objects} == {"heart", "square"}
    assert {(o.row, o.col) for o in objects} == {(r, c) for r in range(3) for c in range(3)}
    assert {o.size for o in objects} == set(SIZES)
    assert "a small cyan heart" in " ".join(s.caption for s in scenes)
    assert generate_scene(0, 3, shapes=["heart"]) == generate_scene(0, 3, shapes=("heart",))


@pytest.mark.parametrize("kwargs,message", [({"colours": ["pink"]}, "colours must be distinct names"),
                                            ({"shapes": []}, "shapes must be distinct names"),
                                            ({"shapes": ["heart", "heart"]}, "shapes must be distinct names")])
def test_unknown_vocabulary_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_scene(0, 0, **kwargs)


@pytest.mark.parametrize("side", sorted(SIZES.values()))
def test_heart_is_an_upside_down_triangle_with_lobes(side):
    """Mirror-symmetric, wide on top and pointed at the bottom: what the evaluator's heart rule reads."""
    mask = shape_mask("heart", side, 0, 0, canvas=side)
    widths = mask.sum(axis=1)
    assert (mask == mask[:, ::-1]).all()
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), "fills its bounding box"
    assert widths[:side // 3].mean() > 2 * widths[-(side // 3):].mean()
    assert widths[-1] <= 2 and widths.max() == side
    assert 0.6 < mask.mean() < 0.75


def test_new_concepts_parse_back():
    assert parse_caption("a small cyan heart on the left and a large red circle at the top") == [
        {"size": "small", "colour": "cyan", "shape": "heart", "row": 1, "col": 0},
        {"size": "large", "colour": "red", "shape": "circle", "row": 0, "col": 1}]


def test_make_shapes_cli_draws_the_new_concepts(tmp_path, capsys):
    out = tmp_path / "hearts"
    assert main(["make-shapes", str(out), "--count", "4", "--seed", "1", "--colours", "cyan", "red",
                 "--shapes", "heart"]) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [generate_scene(1, i, ["cyan", "red"], ["heart"]).caption
                                            for i in range(4)]
    assert {o["shape"] for r in records for o in r["objects"]} == {"heart"}
    assert main(["make-shapes", str(tmp_path / "bad"), "--count", "2", "--colours", "pink"]) == 2
    assert "colours must be distinct names from" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
