"""Control images: Canny edges on the border of a drawn square and nowhere else; maps of regions keep their exact
colours when resized; every image comes out RGB in [0, 1] at the output's size; unknown types are named."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latent_diffusion.conditioning.control_images import CONTROL_TYPES, control_type

pytest.importorskip("skimage")


def square(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (20, 20, 20))
    ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill=(230, 230, 230))
    return image


def test_canny_finds_the_border_of_a_square_and_nothing_inside_or_outside():
    edges = control_type("canny").prepare(square(), 64, 64)[0, 0].numpy() > 0.5
    ring = np.zeros((64, 64), dtype=bool)
    ring[13:51, 13:51] = True
    ring[19:45, 19:45] = False
    assert edges[ring].sum() > 100  # the four sides
    assert not edges[~ring].any()


def test_maps_of_regions_keep_their_exact_colours_when_resized():
    colours = [(120, 120, 120), (4, 200, 3), (230, 230, 230)]
    seg = np.zeros((30, 30, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        seg[:, i * 10:(i + 1) * 10] = colour
    out = control_type("seg").prepare(Image.fromarray(seg), 64, 48)
    found = {tuple(c) for c in (out[0].permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    assert found == set(colours)


@pytest.mark.parametrize("name", list(CONTROL_TYPES))
def test_every_type_gives_an_rgb_image_in_0_1_at_the_output_size(name):
    out = CONTROL_TYPES[name].prepare(square(40).convert("L"), 32, 24)
    assert out.shape == (1, 3, 24, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_unknown_types_are_named():
    with pytest.raises(ValueError, match="unknown control type 'sketch'; known: canny, seg, mask, none, depth"):
        control_type("sketch")
