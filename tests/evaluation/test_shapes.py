"""The caption-adherence evaluator reads rendered scenes back exactly and catches wrong attributes; `ldm eval-adherence`
measures a model over guidance scales, samplers and steps."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFilter

from latent_diffusion.cli import main
from latent_diffusion.data.shapes import generate_scene, render_scene
from latent_diffusion.evaluation.shapes import caption_adherence, score_image
from latent_diffusion.formats.autoencoder import load_autoencoder
from latent_diffusion.images import pil_to_tensor, tensor_to_pil


def test_ground_truth_scenes_score_perfectly_even_blurred():
    scenes = [generate_scene(5, i) for i in range(150)]
    images = [render_scene(s) for s in scenes]
    captions = [s.caption for s in scenes]
    assert caption_adherence(images, captions)["all"] == 1.0
    blurred = [im.filter(ImageFilter.GaussianBlur(0.8)) for im in images]
    assert caption_adherence(blurred, captions)["all"] >= 0.97


def test_wrong_attributes_are_caught():
    scene = generate_scene(0, 2)  # one large green square in the top right
    image = render_scene(scene)
    assert score_image(image, "a large green square in the top right") == [
        {"colour": True, "shape": True, "size": True, "position": True}]
    assert score_image(image, "a small green square in the top right")[0]["size"] is False
    assert score_image(image, "a large green circle in the top right")[0]["shape"] is False
    assert score_image(image, "a large green square in the bottom left")[0]["position"] is False
    assert score_image(image, "a large red square in the top right")[0] == {
        "colour": False, "shape": False, "size": False, "position": False}
    figures = caption_adherence([image, image], ["a large green square in the top right",
                                                 "a large green circle in the top right"])
    assert figures["all"] == 0.5 and figures["shape"] == 0.5 and figures["colour"] == 1.0


def test_reconstructions_of_the_shipped_autoencoder_score_perfectly():
    """Soft edges (as a decoder makes them) must not change the verdict: the evaluator's ceiling is 100 %."""
    model, _ = load_autoencoder(Path(__file__).parents[2] / "models" / "autoencoder-shapes-f4")
    scenes = [generate_scene(9, i) for i in range(100)]
    x = torch.stack([pil_to_tensor(render_scene(s)) for s in scenes])
    with torch.no_grad():
        recon = model.decode(model.encode(x).mode())
    figures = caption_adherence([tensor_to_pil(r) for r in recon], [s.caption for s in scenes])
    assert figures["all"] >= 0.97


def test_cli_eval_adherence_writes_figures(ldm_run, shapes_folder, tmp_path, capsys):
    out = tmp_path / "adh"
    assert main(["eval-adherence", str(ldm_run), "--data", str(shapes_folder), "--num", "10", "--guidance", "1",
                 "3", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    figures = json.loads((out / "adherence.json").read_text())
    assert [(f["sampler"], f["steps"], f["guidance"]) for f in figures["results"]] == [("dpmpp_2m", 2, 1.0),
                                                                                       ("dpmpp_2m", 2, 3.0)]
    assert 0.0 <= figures["results"][1]["all"] <= 1.0 and figures["results"][0]["objects"] >= 10
    assert (out / "samples_w3.0.png").is_file() and (out / "adherence.png").is_file()
    assert "dpmpp_2m 2 steps w=3.0: all attributes" in capsys.readouterr().out


def test_cli_eval_adherence_sweeps_samplers_and_steps(ldm_run, shapes_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["eval-adherence", str(ldm_run), "--data", str(shapes_folder), "--num", "4", "--guidance", "2",
                 "--steps", "1", "2", "--sampler", "ddim", "euler", "--out", str(out), "--device", "cpu"]) == 0
    figures = json.loads((out / "adherence.json").read_text())
    assert [(f["sampler"], f["steps"]) for f in figures["results"]] == [("ddim", 1), ("ddim", 2), ("euler", 1),
                                                                         ("euler", 2)]
    assert (out / "samples_euler_2_w2.0.png").is_file() and (out / "adherence.png").is_file()
    assert main(["eval-adherence", str(ldm_run), "--data", str(shapes_folder), "--sampler", "ddim", "nope",
                 "--device", "cpu"]) == 2
    assert "unknown sampler(s) ['nope']" in capsys.readouterr().err



def test_layout_iou_of_a_scene_with_its_own_mask_is_one_and_of_an_empty_image_zero():
    from PIL import Image

    from latent_diffusion.data.shapes import BACKGROUNDS, control_map
    from latent_diffusion.evaluation.shapes import layout_iou

    scene, other = generate_scene(5, 2), generate_scene(5, 3)
    mask = np.asarray(control_map(scene))[..., 0] > 127
    assert layout_iou(render_scene(scene), mask) == 1.0
    assert layout_iou(Image.new("RGB", (64, 64), BACKGROUNDS[scene.background]), mask) == 0.0
    assert layout_iou(render_scene(other), mask) < 0.5
