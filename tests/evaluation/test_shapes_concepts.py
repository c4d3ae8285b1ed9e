"""The new concepts (cyan, heart) read back as reliably as the old vocabulary, and knowing them changed none of the
evaluator's verdicts on old captions."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from latent_diffusion.data.shapes import COLOURS, SHAPES, generate_scene, render_scene
from latent_diffusion.evaluation.shapes import caption_adherence, detect_objects, sample_adherence, score_image
from latent_diffusion.formats.autoencoder import load_autoencoder
from latent_diffusion.images import pil_to_tensor, tensor_to_pil

AUTOENCODER = Path(__file__).parents[2] / "models" / "ldm-shapes" / "autoencoder"
EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def _round_trip(images: list[Image.Image]) -> list[Image.Image]:
    model, _ = load_autoencoder(AUTOENCODER)
    with torch.no_grad():
        recon = model.decode(model.encode(torch.stack([pil_to_tensor(im) for im in images])).mode())
    return [tensor_to_pil(r) for r in recon]


def _perturbed(image: Image.Image, k: int) -> Image.Image:
    if k % 3 == 1:
        return image.filter(ImageFilter.GaussianBlur(1.6))
    if k % 3 == 2:
        noise = np.random.default_rng(k).normal(0, 40, (64, 64, 3))
        return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    return image


def test_verdicts_on_old_captions_are_unchanged():
    """Digest of 360 verdicts (198 true) on clean, blurred and noisy scenes, half scored against another scene's
    caption, taken with the evaluator before the new concepts existed."""
    scenes = [generate_scene(21, i) for i in range(60)]
    verdicts = [score_image(_perturbed(render_scene(s), i), scenes[(i + i % 2) % len(scenes)].caption)
                for i, s in enumerate(scenes)]
    assert sum(v for vs in verdicts for o in vs for v in o.values()) == 198
    assert hashlib.sha256(json.dumps(verdicts).encode()).hexdigest() == \
        "5db1878d07fef0717d192902517e298580c1205213723f4920c48cea9916e0f0"


def test_a_new_concept_where_an_old_one_was_asked_for_is_wrong():
    """Old captions are read with the whole vocabulary, so an adapter that leaks its concept into them is caught."""
    scene = generate_scene(0, 2, colours=["cyan"], shapes=["heart"])  # one small cyan heart
    image, caption = render_scene(scene), scene.caption
    assert score_image(image, caption)[0] == dict.fromkeys(("colour", "shape", "size", "position"), True)
    assert score_image(image, caption.replace("cyan", "blue"))[0]["colour"] is False
    blue_heart = render_scene(generate_scene(0, 2, colours=["blue"], shapes=["heart"]))
    assert score_image(blue_heart, caption.replace("cyan", "blue").replace("heart", "circle"))[0] == {
        "colour": True, "shape": False, "size": True, "position": True}
    as_before = detect_objects(blue_heart, COLOURS, SHAPES)  # the old reading calls it a circle
    assert [(o.colour, o.shape) for o in as_before] == [("blue", "circle")]


@pytest.mark.parametrize("colours,shapes", [(["cyan"], None), (None, ["heart"]), (["cyan", "red"], ["heart"])])
def test_ground_truth_concept_scenes_score_perfectly_even_blurred(colours, shapes):
    scenes = [generate_scene(5, i, colours, shapes) for i in range(60)]
    images, captions = [render_scene(s) for s in scenes], [s.caption for s in scenes]
    assert caption_adherence(images, captions)["all"] == 1.0
    blurred = [im.filter(ImageFilter.GaussianBlur(0.8)) for im in images]
    assert caption_adherence(blurred, captions)["all"] == 1.0


def test_wrong_heart_attributes_are_caught():
    scene = generate_scene(0, 2, shapes=["heart"])  # one small blue heart
    heart, caption = render_scene(scene), scene.caption
    assert score_image(heart, caption)[0] == dict.fromkeys(("colour", "shape", "size", "position"), True)
    assert score_image(heart, caption.replace("heart", "circle"))[0]["shape"] is False
    assert score_image(heart, caption.replace("small", "large"))[0]["size"] is False
    circle = render_scene(generate_scene(0, 2, shapes=["circle"]))
    assert score_image(circle, caption)[0] == {"colour": True, "shape": False, "size": True, "position": True}


def test_hearts_survive_the_bundled_first_stage_and_old_shapes_are_not_read_as_hearts():
    """A 12 px heart is 3×3 latent pixels: the decoder's blur must leave it a heart (99.8 % of 457 objects over
    300 scenes), and no circle, square or triangle becomes one."""
    hearts = [generate_scene(4, i, shapes=["heart"]) for i in range(20)]
    old = [generate_scene(9, i) for i in range(20)]
    recon = _round_trip([render_scene(s) for s in hearts + old])
    assert caption_adherence(recon[:20], [s.caption for s in hearts])["shape"] >= 0.97
    read = [o for im in recon[20:] for o in detect_objects(im) if o.area >= 50]
    assert len(read) >= sum(len(s.objects) for s in old) and not [o for o in read if o.shape == "heart"]


def test_the_bundled_first_stage_cannot_draw_cyan():
    """Why a LoRA on the UNet alone cannot teach the bundled model a colour: its decoder only knows the six it was
    trained on (cyan comes back blue), while it reproduces a heart."""
    scenes = [generate_scene(6, i, colours=["cyan"]) for i in range(12)]
    recon = _round_trip([render_scene(s) for s in scenes])
    assert caption_adherence(recon, [s.caption for s in scenes])["colour"] == 0.0
    assert caption_adherence(recon, [s.caption.replace("cyan", "blue") for s in scenes])["all"] >= 0.9


class _GroundTruthPipe:
    """Draws each prompt's scene exactly (a perfect model); an embedding makes `<heart>` mean heart."""

    def __init__(self, scenes):
        self.scenes, self.calls, self.trigger = {s.caption: s for s in scenes}, [], None

    def load_embedding(self, path, token=None):
        self.trigger = "<heart>"
        return self.trigger

    def __call__(self, prompts, steps, guidance_scale, sampler, seed, progress):
        self.calls.append((len(prompts), steps, guidance_scale, sampler, seed))
        captions = [p.replace(self.trigger, "heart") if self.trigger else p for p in prompts]
        return [render_scene(self.scenes[c]) if c in self.scenes else Image.new("RGB", (64, 64), "white")
                for c in captions]


def test_sample_adherence_draws_every_caption_once_per_seed():
    scenes = [generate_scene(3, i) for i in range(5)]
    pipe = _GroundTruthPipe(scenes)
    figures, images = sample_adherence(pipe, [s.caption for s in scenes], seeds=[0, 100], steps=7,
                                       guidance_scale=2.0, sampler="ddim")
    assert figures["all"] == 1.0 and len(images) == 10
    assert figures["objects"] == 2 * sum(len(s.objects) for s in scenes)
    assert pipe.calls == [(5, 7, 2.0, "ddim", 0), (5, 7, 2.0, "ddim", 100)]
    with pytest.raises(ValueError, match="one prompt per caption"):
        sample_adherence(pipe, ["a"], seeds=[0], steps=1, guidance_scale=1.0, sampler="ddim", prompts=[])


def test_personalise_experiment_scores_trigger_prompts_against_plain_captions():
    spec = importlib.util.spec_from_file_location("personalise", EXPERIMENTS / "personalise.py")
    personalise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(personalise)
    concept = personalise.held_out_captions(4, 20_000, "heart")
    old = personalise.held_out_captions(4, 20_001, exclude={generate_scene(20_001, 0).caption})
    assert all("heart" in c for c in concept) and not any("heart" in c for c in old)
    assert generate_scene(20_001, 0).caption not in old
    scenes = [generate_scene(20_000, i, shapes=["heart"]) for i in range(40)] + \
        [generate_scene(20_001, i) for i in range(40)]
    settings = {"seeds": [0], "steps": 2, "guidance_scale": 5.0, "sampler": "ddim"}
    row, _ = personalise.measure_row(lambda: _GroundTruthPipe(scenes), "ti", "heart", concept, old, settings,
                                     embedding="heart.pt")
    assert row["example_prompt"] == personalise.with_trigger(concept[0], "heart", "<heart>")
    assert row["concept"]["all"] == 1.0 and row["old"]["all"] == 1.0
    before, _ = personalise.measure_row(lambda: _GroundTruthPipe(scenes[40:]), "before", "heart", concept, old,
                                        settings)
    assert before["concept"]["all"] == 0.0 and before["old"]["all"] == 1.0
