"""Image grids: rows of batches, with captions under the rows or under each image."""

import numpy as np
import pytest
import torch

from latent_diffusion.images import make_grid


def _rows(count=2, n=4, channels=3, size=16):
    return [torch.full((n, channels, size, size), -0.2) for _ in range(count)]


def _dark_rows(image):
    """Indices of pixel rows that hold near-black pixels (text; the images are mid-grey, the ground white)."""
    return np.nonzero((np.asarray(image.convert("L")) < 60).any(axis=1))[0]


def test_captions_are_written_in_a_strip_under_each_row():
    plain = make_grid(_rows(), scale=4)
    captioned = make_grid(_rows(), scale=4, captions=["a small red circle in the center", "a large blue square"])
    assert captioned.width == plain.width and captioned.height > plain.height
    row_bottom = 8 + 64  # pad, then the first row of images (16 px × 4)
    text = _dark_rows(captioned)
    assert len(text) and text.min() >= row_bottom  # text, but below the first row of images
    assert np.array_equal(np.asarray(captioned)[:row_bottom], np.asarray(plain)[:row_bottom])  # images unchanged


def test_long_captions_wrap_and_per_image_captions_stay_in_their_column():
    long = " ".join(["a large red circle in the top left"] * 3)
    one_line = make_grid(_rows(1), scale=4, captions=["short"])
    wrapped = make_grid(_rows(1), scale=4, captions=[long])
    assert wrapped.height > one_line.height and wrapped.width == one_line.width
    per_image = make_grid(_rows(1, channels=1), scale=4, captions=[["one", "", "", ""]])
    dark_columns = np.nonzero((np.asarray(per_image) < 60).any(axis=0))[0]
    assert per_image.mode == "L" and dark_columns.max() < 8 + 64  # under the first image only


def test_a_caption_per_row_is_required():
    with pytest.raises(ValueError, match="1 captions for 2 rows"):
        make_grid(_rows(), captions=["only one"])
