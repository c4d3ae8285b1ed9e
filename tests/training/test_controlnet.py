"""ControlNet training data and `ldm train-controlnet`: make-shapes writes control maps that are the objects'
silhouettes; an image folder gives each image its map, cropped and flipped with it; the latent cache keeps them;
a few training steps on a tiny model write a ControlNet file that loads and no longer adds zeros; resuming goes on."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.data.imagefolder import ImageFolder
from latent_diffusion.data.shapes import BACKGROUNDS, control_map, generate_scene, write_shapes_folder
from latent_diffusion.formats.controlnet import load_controlnet
from latent_diffusion.formats.model import save_model
from latent_diffusion.training.latent_cache import encode_dataset

from conftest import TINY_SD1, tiny_original_parts


@pytest.fixture(scope="module")
def control_folder(tmp_path_factory):
    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "data", 12, seed=3, progress=False,
                               control="mask")


def test_control_maps_are_the_silhouettes_of_the_objects(control_folder):
    records = [json.loads(line) for line in (control_folder / "metadata.jsonl").read_text().splitlines()]
    for k, record in enumerate(records[:4]):
        image = np.asarray(Image.open(control_folder / record["file_name"]))
        silhouette = np.asarray(Image.open(control_folder / record["conditioning_image"]))[..., 0] > 127
        background = np.all(image == BACKGROUNDS[record["background"]], axis=-1)
        assert np.array_equal(silhouette, ~background), k
    edges = np.asarray(control_map(generate_scene(3, 0), "edges"))[..., 0] > 127
    mask = np.asarray(control_map(generate_scene(3, 0), "mask"))[..., 0] > 127
    assert edges.sum() < mask.sum() and not (edges & ~mask).any()


def test_an_image_folder_gives_each_image_its_map_cropped_and_flipped_with_it(control_folder):
    plain = ImageFolder(control_folder, resolution=64)
    assert len(plain) == 12  # the maps under conditioning/ are not training images
    flipped = ImageFolder(control_folder, resolution=48, random_crop=True, flip=True, seed=1)
    for i in range(len(flipped)):
        item = flipped[i]
        shown = (item["image"] + 1) / 2
        background = (shown - shown[:, :1, :1]).abs().amax(0) < 0.05
        assert item["control"].shape == (3, 48, 48) and item["control"].min() >= 0
        agree = ((item["control"][0] > 0.5) == ~background).float().mean()
        assert agree > 0.97, i  # bicubic resizing blurs a pixel's width of the image's edges


def test_the_latent_cache_keeps_the_control_maps(control_folder, tmp_path):
    parts = tiny_original_parts(TINY_SD1, resolution=64)
    unet, autoencoder, _ = parts.networks(torch.device("cpu"))
    dataset = ImageFolder(control_folder, resolution=64)
    cache = encode_dataset(autoencoder, dataset, tmp_path, batch_size=5, progress=False)
    again = encode_dataset(autoencoder, dataset, tmp_path, batch_size=5, progress=False)  # read back from disk
    maps = again.control_maps(torch.tensor([0, 7]))
    assert torch.equal(maps, cache.control_maps(torch.tensor([0, 7])))
    assert torch.allclose(maps, torch.stack([dataset[0]["control"], dataset[7]["control"]]), atol=1 / 255)


def test_train_controlnet_writes_a_controlnet_that_learnt_and_resumes(control_folder, tmp_path, capsys):
    model = tmp_path / "tiny-sd.safetensors"
    save_model(tiny_original_parts(TINY_SD1, resolution=32), model, "original")
    train = ["train-controlnet", "--model", str(model), "--data", str(control_folder), "--out", str(tmp_path / "run"),
             "--control-type", "mask", "--batch-size", "2", "--resolution", "32", "--lr", "1e-3", "--device", "cpu",
             "--save-every", "2", "--set", "sample_steps=2"]
    assert main([*train, "--steps", "2"]) == 0
    net = load_controlnet(tmp_path / "run" / "controlnet.safetensors")
    assert any(conv[0].weight.abs().max() > 0 for conv in net.zero_convs)  # the zero convolutions moved
    assert (tmp_path / "run" / "samples").is_dir()
    assert main([*train, "--steps", "4"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert max(entry.get("step", 0) for entry in log) == 4
    assert main([*train[:6], str(tmp_path / "diffusers-run"), *train[7:], "--steps", "1", "--format", "diffusers"]) == 0
    folder = load_controlnet(tmp_path / "diffusers-run" / "controlnet")  # a ControlNetModel folder, beside the file
    file = load_controlnet(tmp_path / "diffusers-run" / "controlnet.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(folder.state_dict().values(), file.state_dict().values(), strict=True))
    assert main(["train-controlnet", "--model", str(model), "--data", str(control_folder.parent / "missing"),
                 "--out", str(tmp_path / "other")]) == 2


def test_training_data_without_control_maps_is_a_clear_error(shapes_folder, tmp_path, capsys):
    model = tmp_path / "tiny-sd.safetensors"
    save_model(tiny_original_parts(TINY_SD1, resolution=32), model, "original")
    assert main(["train-controlnet", "--model", str(model), "--data", str(shapes_folder), "--out",
                 str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--resolution", "32",
                 "--device", "cpu"]) == 2
    assert "its images have no control maps" in capsys.readouterr().err
