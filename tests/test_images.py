"""Images: grids of batches with captions under the rows or under each image; input images of every mode read at their
tones."""

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.images import make_grid, open_image


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


def test_open_image_reads_16_bit_palette_cmyk_and_float_images_at_their_tones(tmp_path):
    ramp = np.linspace(0, 1, 64)[None, :].repeat(8, axis=0)  # 0 → 1 left to right
    expected = np.round(ramp * 255)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "16bit.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")  # mode F
    Image.fromarray(np.round(ramp * 65535).astype(np.int32)).save(tmp_path / "int.tiff")  # mode I
    Image.fromarray(expected.astype(np.uint8)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(expected.astype(np.uint8)).convert("RGB").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    for name in ("16bit.png", "float.tiff", "int.tiff", "palette.png", "cmyk.jpg"):
        rgb = np.asarray(open_image(tmp_path / name, "RGB"), dtype=np.float64)
        assert rgb.shape == (8, 64, 3) and np.abs(rgb - expected[:, :, None]).max() <= 3, name
