"""The pipeline: image k of a batch is the image drawn alone with seed + k (every sampler), the same seed draws the same
image, bad requests are clear errors, images are saved with their parameters."""

import pytest
import torch
from PIL import Image

from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.images import read_parameters
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.samplers import SAMPLERS

PROMPT = "a small green triangle in the center"


DIFFUSION_SAMPLERS = [name for name, spec in SAMPLERS.items() if spec.objective == "diffusion"]  # flow: test_dit_flow


@pytest.mark.parametrize("sampler,options", [(name, {}) for name in DIFFUSION_SAMPLERS] + [("ddim", {"eta": 0.6})])
def test_image_k_of_a_batch_is_the_image_drawn_alone_with_seed_plus_k(bundled_pipe, sampler, options):
    kwargs = dict(steps=2, sampler=sampler, progress=False, **options)
    batch = bundled_pipe.generate_tensors(PROMPT, seed=5, num_images=3, **kwargs)
    for k in range(3):
        alone = bundled_pipe.generate_tensors(PROMPT, seed=5 + k, **kwargs)
        assert (batch[k] - alone[0]).abs().max().item() < 1e-4, f"image {k}"


def test_generation_is_deterministic_for_a_seed(ldm_run):
    pipe = Pipeline.from_pretrained(ldm_run, device="cpu")
    kwargs = dict(steps=3, guidance_scale=3.0, sampler="dpmpp_2m", num_images=2, progress=False)
    a = pipe.generate_tensors("a large blue square on the left", seed=1, **kwargs)
    b = pipe.generate_tensors("a large blue square on the left", seed=1, **kwargs)
    c = pipe.generate_tensors("a large blue square on the left", seed=2, **kwargs)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    wide = pipe.generate_tensors("a small red circle", seed=1, steps=2, width=64, progress=False)
    assert wide.shape == (1, 3, 32, 64)


def test_bad_generation_requests_are_clear_errors(ldm_run, tmp_path):
    pipe = Pipeline.from_pretrained(ldm_run, device="cpu")
    with pytest.raises(ValueError, match="height = 30: expected a positive multiple of 4"):
        pipe.generate_tensors("x", height=30)
    with pytest.raises(ValueError, match="steps = 0"):
        pipe.generate_tensors("x", steps=0)
    with pytest.raises(ValueError, match="unknown sampler 'fast'; known samplers: ddim, ddpm, dpmpp_2m"):
        pipe.generate_tensors("x", sampler="fast")
    with pytest.raises(ValueError, match="guidance scale = -1"):
        pipe.generate_tensors("x", guidance_scale=-1.0)
    with pytest.raises(CheckpointError, match="is not a model folder"):
        Pipeline.from_pretrained(tmp_path, device="cpu")


def test_pipeline_save_writes_numbered_files_with_their_parameters(tmp_path):
    images = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    files = Pipeline.save(images, tmp_path / "s.webp", ["a", "b", None])
    assert [f.name for f in files] == ["s.webp", "s-1.webp", "s-2.webp"]
    assert [read_parameters(f) for f in files] == ["a", "b", None] and Image.open(files[1]).format == "WEBP"
