"""The caption-adherence evaluator reads rendered scenes back exactly and catches wrong attributes."""

from pathlib import Path

import pytest
from PIL import ImageFilter

from latent_diffusion.data.shapes import generate_scene, render_scene
from latent_diffusion.evaluation.shapes import caption_adherence, score_image


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
    import torch

    from latent_diffusion.images import pil_to_tensor, tensor_to_pil
    from latent_diffusion.formats.autoencoder import load_autoencoder

    model, _ = load_autoencoder(Path(__file__).parents[1] / "models" / "autoencoder-shapes-f4")
    scenes = [generate_scene(9, i) for i in range(100)]
    x = torch.stack([pil_to_tensor(render_scene(s)) for s in scenes])
    with torch.no_grad():
        recon = model.decode(model.encode(x).mode())
    figures = caption_adherence([tensor_to_pil(r) for r in recon], [s.caption for s in scenes])
    assert figures["all"] >= 0.97


def test_sweep_settings_and_series():
    from latent_diffusion.evaluation.sweep import settings, sweep_series

    sweep = settings(["ddim", "euler"], [5, 10], [3.0])
    assert [(s.sampler, s.steps) for s in sweep] == [("ddim", 5), ("ddim", 10), ("euler", 5), ("euler", 10)]
    results = [{**s.as_dict(), "all": i / 10} for i, s in enumerate(sweep)]
    x_key, series = sweep_series(results, {"all": "all"})
    assert x_key == "steps" and series == {"ddim": ([5.0, 10.0], [0.0, 0.1]), "euler": ([5.0, 10.0], [0.2, 0.3])}
    results = [{**s.as_dict(), "all": 0.5, "fid": 1.0} for s in settings(["ddim"], [5], [1, 2])]
    x_key, series = sweep_series(results, {"all": "all", "fid": "FID"})
    assert x_key == "guidance" and series["FID"] == ([1.0, 2.0], [1.0, 1.0]) and set(series) == {"all", "FID"}
    for bad in (dict(samplers=["nope"], steps=[5], guidance=[1]), dict(samplers=["ddim"], steps=[0], guidance=[1]),
                dict(samplers=["ddim"], steps=[5], guidance=[-1])):
        with pytest.raises(ValueError):
            settings(**bad)
