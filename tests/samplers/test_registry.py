"""A new sampler is one function registered where it is defined: its name, its options and its grid reach every
caller, the pipeline included, with no signature inspection."""

import pytest
import torch

from latent_diffusion.conditioning.class_embedder import ClassEmbedder
from latent_diffusion.config import ConditioningConfig
from latent_diffusion.diffusion.schedule import make_schedule
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.samplers import SAMPLERS, GridOptions, register, resolve_sampler, sampler_options
from latent_diffusion.samplers.grid import sigma_grid
from latent_diffusion.samplers.registry import GRID_OPTIONS

from conftest import randomised, tiny_model_parts

SCHEDULE = make_schedule()


def sample_x0(denoiser, noise, grid, *, generator=None, callback=None, extra_args=None):
    """One network evaluation: D(x; σ_0), the data the first step points at."""
    return denoiser.denoise(noise * grid.init_noise_sigma, grid.sigmas[0], **(extra_args or {}))


@pytest.fixture
def registered():
    """`sample_x0` registered as "x0" (on the Euler samplers' σ grid) for the length of a test."""
    register("x0", sigma_grid, ("spacing", "steps_offset", "karras"))(sample_x0)
    yield SAMPLERS["x0"]
    del SAMPLERS["x0"]


def test_every_entry_declares_known_grid_options_and_its_own():
    for name, spec in SAMPLERS.items():
        assert spec.name == name and set(spec.grid_options) <= set(GRID_OPTIONS)
        assert not set(spec.options) & set(GRID_OPTIONS)


def test_a_registered_sampler_is_known_by_name_with_its_options(registered):
    assert resolve_sampler("X0 Karras") == ("x0", True)
    assert sampler_options("x0") == ("spacing", "steps_offset", "karras")
    assert registered.make_grid(SCHEDULE, 4, GridOptions(karras=True)) == sigma_grid(SCHEDULE, 4, karras=True)


def test_the_pipeline_runs_a_registered_sampler_on_its_grid(registered):
    """One Euler step lands on D(x; σ_0): the new sampler must draw the same image."""
    parts = tiny_model_parts(ConditioningConfig(encoder="class", num_classes=3),
                             randomised(ClassEmbedder(3, 8), 3).state_dict())
    pipe = Pipeline.from_parts(parts, device="cpu")
    ours = pipe.generate_tensors("1", sampler="x0", steps=1, seed=4, progress=False)
    euler = pipe.generate_tensors("1", sampler="euler", steps=1, seed=4, progress=False)
    torch.testing.assert_close(ours, euler, atol=1e-5, rtol=0)
    assert pipe.generate_tensors("1", sampler="x0", steps=1, karras=True, seed=4, progress=False).shape == ours.shape


def test_registering_twice_or_an_unknown_grid_option_is_an_error(registered):
    with pytest.raises(ValueError, match="a sampler named 'x0' is registered already"):
        register("x0", sigma_grid, ())(sample_x0)
    with pytest.raises(ValueError, match=r"unknown grid options \['eta'\]"):
        register("x1", sigma_grid, ("eta",))(sample_x0)
    assert "x1" not in SAMPLERS
