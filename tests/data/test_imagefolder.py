"""Image folders: captions from .txt files and metadata.jsonl, crops, unreadable images skipped with a warning, the
tones of every image mode."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.data import open_dataset
from latent_diffusion.data.imagefolder import ImageFolder


def _write_folder(root):
    root.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "a.png")
    (root / "a.txt").write_text("a red thing\n")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "b.jpg")
    sub = root / "sub"
    sub.mkdir()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(sub / "c.webp")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.jpg", "text": "a blue thing"}) + "\n"
        + json.dumps({"file_name": "sub/c.webp", "text": "a green thing"}) + "\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_image_folder_reads_txt_and_metadata_captions_and_crops(tmp_path):
    ds = ImageFolder(_write_folder(tmp_path / "imgs"), resolution=16)
    items = {ds.files[i].name: ds[i] for i in range(len(ds)) if ds.files[i].name != "broken.png"}
    assert items["a.png"]["caption"] == "a red thing"
    assert items["b.jpg"]["caption"] == "a blue thing"
    assert items["c.webp"]["caption"] == "a green thing"
    for item in items.values():
        assert item["image"].shape == (3, 16, 16)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
    red = items["a.png"]["image"]
    assert torch.allclose(red[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    ds = ImageFolder(_write_folder(tmp_path / "imgs"), resolution=16)
    broken = [i for i, f in enumerate(ds.files) if f.name == "broken.png"][0]
    with caplog.at_level(logging.WARNING):
        item = ds[broken]
    assert item["image"].shape == (3, 16, 16)
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert sum(b["image"].shape[0] for b in loader) == len(ds)  # a whole epoch, no crash


def test_random_crop_and_flip_keep_the_size(tmp_path):
    ds = ImageFolder(_write_folder(tmp_path / "imgs"), resolution=12, random_crop=True, flip=True, channels=1)
    assert ds[0]["image"].shape == (1, 12, 12)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        open_dataset(tmp_path / "nope", 16, 3)


@pytest.mark.parametrize("column", ["text", "caption", "prompt"])
def test_metadata_captions_are_read_from_the_columns_people_use(tmp_path, column):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "x.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", column: "a dark square"}) + "\n")
    assert ImageFolder(root, resolution=8).caption(0) == "a dark square"


def test_a_caption_that_is_not_utf8_names_its_file(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "x.png")
    (root / "x.txt").write_bytes("un carré foncé".encode("latin-1"))
    with pytest.raises(ValueError, match=r"x\.txt: captions must be UTF-8"):
        ImageFolder(root, resolution=8)
    assert ImageFolder(root, resolution=8, captions=False)[0]["caption"] == ""  # image-only training reads none


def test_a_decompression_bomb_is_skipped_like_other_unreadable_images(tmp_path, caplog, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "a_huge.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # 4,096 pixels is then > 2 × the limit
    with caplog.at_level(logging.WARNING):
        item = ImageFolder(root, resolution=8)[0]
    assert "skipping an unreadable image" in caplog.text and "a_huge.png" in caplog.text
    assert item["image"][2].mean() == 1.0  # the next image, b.png (blue)
    (root / "b.png").unlink()
    with pytest.raises(ValueError, match="none of its 1 images can be read"):
        ImageFolder(root, resolution=8)[0]


def _modes(root):
    """One mid-grey image in each mode people's files come in: 16-bit PNG, 32-bit int, float, palette, CMYK."""
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(root / "a_16bit.png")  # 32896 / 257 = 128
    Image.fromarray(np.full((8, 8), 32896, dtype=np.int32), "I").save(root / "b_int.tiff")
    Image.fromarray(np.full((8, 8), 128 / 255, dtype=np.float32), "F").save(root / "c_float.tiff")
    Image.new("RGB", (8, 8), (128, 128, 128)).convert("P").save(root / "d_palette.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 127)).save(root / "e_cmyk.jpg", quality=100)
    return root


def test_16_bit_float_palette_and_cmyk_images_keep_their_tones(tmp_path):
    root = _modes(tmp_path / "imgs")
    folder = ImageFolder(root, resolution=8)
    folder.files = sorted(root.iterdir())  # .tiff is no image-folder extension: read them through the same loader
    assert [p.name for p in folder.files][:3] == ["a_16bit.png", "b_int.tiff", "c_float.tiff"]
    for i, path in enumerate(folder.files):
        assert Image.open(path).mode in ("I;16", "I", "F", "P", "CMYK")
        image = folder[i]["image"]
        assert image.shape == (3, 8, 8)
        assert abs(image.mean().item()) < 0.02, f"{path.name}: mean {image.mean().item():.3f}, expected mid-grey"
