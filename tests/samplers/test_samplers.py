"""Samplers: parity with diffusers' schedulers on one deterministic model, an analytic Gaussian check, errors."""

from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler)

from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.schedule import interpolate, make_schedule
from latent_diffusion.samplers import (SAMPLERS, GridOptions, get_sampler, resolve_sampler, sampler_label,
                                       sampler_options)

SHAPE = (2, 4, 6, 10)  # non-square latents
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_GRID = GridOptions(spacing="leading", steps_offset=1, set_alpha_to_one=False)


MU, S = 0.7, 0.6  # data x_0 ~ N(μ, s²) per element


def gaussian_model(schedule, prediction_type="epsilon", wobble=0.0):
    """The optimal network for Gaussian data, E[x_0 | x_t] = μ + √ᾱ s² (x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ), as ε, v or x_0;
    `wobble` adds a perturbation nonlinear in x and t. ᾱ at fractional t comes from log-σ interpolation."""
    def model(x, t):
        abar = 1 / (1 + interpolate(schedule.log_sigmas, t).exp() ** 2)
        a, s = abar.sqrt().to(x.dtype)[:, None, None, None], (1 - abar).sqrt().to(x.dtype)[:, None, None, None]
        x0 = MU + a * S**2 * (x - a * MU) / (a**2 * S**2 + s**2)
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
        return out + wobble * torch.sin(3 * x) * torch.cos(t / 300)[:, None, None, None]
    return model


@dataclass
class Case:
    sampler: str
    scheduler: partial  # makes a diffusers scheduler configured to match `grid` and `options`
    grid: GridOptions = GridOptions()
    options: dict = field(default_factory=dict)  # the sampler's own
    step_kwargs: dict = field(default_factory=dict)
    schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    quantize: bool = False
    stochastic: bool = False


SD_DDIM = partial(DDIMScheduler, **SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
DPMPP_2M = partial(DPMSolverMultistepScheduler, **SD, algorithm_type="dpmsolver++", solver_order=2)
CASES = {
    "ddpm": Case("ddpm", partial(DDPMScheduler, clip_sample=False), schedule="linear", stochastic=True),
    "ddim": Case("ddim", SD_DDIM, SD_GRID),
    "ddim_eta": Case("ddim", SD_DDIM, SD_GRID, dict(eta=0.8), dict(eta=0.8), stochastic=True),
    "ddim_v_zero_snr": Case("ddim", partial(DDIMScheduler, **SD, clip_sample=False, rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction", timestep_spacing="trailing"),
                            GridOptions(spacing="trailing"), prediction_type="v_prediction",
                            zero_terminal_snr=True),
    "plms": Case("plms", partial(PNDMScheduler, **SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
                 GridOptions(spacing="leading", steps_offset=1)),
    "euler": Case("euler", partial(EulerDiscreteScheduler, **SD)),
    "euler_leading": Case("euler", partial(EulerDiscreteScheduler, **SD, timestep_spacing="leading", steps_offset=1),
                          GridOptions(spacing="leading", steps_offset=1)),
    "euler_karras": Case("euler", partial(EulerDiscreteScheduler, **SD, use_karras_sigmas=True),
                         GridOptions(karras=True)),
    "euler_v": Case("euler", partial(EulerDiscreteScheduler, **SD, prediction_type="v_prediction"),
                    prediction_type="v_prediction"),
    "euler_a": Case("euler_a", partial(EulerAncestralDiscreteScheduler, **SD), stochastic=True),
    "heun": Case("heun", partial(HeunDiscreteScheduler, **SD)),
    "heun_karras": Case("heun", partial(HeunDiscreteScheduler, **SD, use_karras_sigmas=True),
                        GridOptions(karras=True)),
    "dpmpp_2m": Case("dpmpp_2m", DPMPP_2M),
    # diffusers rounds the timesteps of Karras sigmas (for non-cosine schedules): a quantizing denoiser
    "dpmpp_2m_karras": Case("dpmpp_2m", partial(DPMPP_2M, use_karras_sigmas=True), GridOptions(karras=True),
                            quantize=True),
}


def draw(name: str, denoiser: Denoiser, noise: torch.Tensor, num_steps: int, grid: GridOptions = GridOptions(),
         **kwargs) -> torch.Tensor:
    """Sampler `name` on its grid of `num_steps` steps (as the pipeline runs it)."""
    sampler = get_sampler(name)
    return sampler.sample(denoiser, noise, sampler.make_grid(denoiser.schedule, num_steps, grid), **kwargs)


def run_diffusers(scheduler, model, noise: torch.Tensor, num_steps: int, **step_kwargs) -> torch.Tensor:
    """The standard diffusers denoising loop (as in StableDiffusionPipeline)."""
    scheduler.set_timesteps(num_steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def run_both(case: Case, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    step_kwargs = dict(case.step_kwargs)
    if case.stochastic:  # both draw their step noise, in the same order, from equally seeded generators
        step_kwargs["generator"] = torch.Generator().manual_seed(1)
    schedule = make_schedule(case.schedule, zero_terminal_snr=case.zero_terminal_snr)
    model = gaussian_model(schedule, case.prediction_type, wobble=0.05)
    expected = run_diffusers(case.scheduler(), model, noise, num_steps, **step_kwargs)
    denoiser = Denoiser(model, schedule, case.prediction_type, quantize=case.quantize)
    ours = draw(case.sampler, denoiser, noise, num_steps, case.grid, generator=torch.Generator().manual_seed(1),
                **case.options)
    return ours, expected


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("name", CASES)
def test_sampler_matches_diffusers_scheduler(name, num_steps):
    ours, expected = run_both(CASES[name], num_steps)
    assert ours.shape == SHAPE and torch.isfinite(ours).all()
    assert (ours - expected).abs().max().item() < 1e-4


DIFFUSION_SAMPLERS = [name for name, spec in SAMPLERS.items() if spec.objective == "diffusion"]  # of the VP process


def test_every_registered_sampler_has_a_parity_case():
    """Here the diffusion samplers; the flow samplers' cases are in test_flow.py."""
    assert {case.sampler for case in CASES.values()} == {n for n, s in SAMPLERS.items() if s.objective == "diffusion"}


@pytest.mark.parametrize("sampler,num_steps,var_tol", [
    ("dpmpp_2m", 50, 0.03),
    ("ddim", 50, 0.12),  # first order: its variance is ~9% low at 50 steps (so is Euler's, the same method)
    ("ddim", 250, 0.03),
])
def test_samplers_with_the_optimal_denoiser_reproduce_gaussian_data(sampler, num_steps, var_tol):
    schedule = make_schedule("linear")
    noise = torch.randn(50, 1, 20, 20, generator=torch.Generator().manual_seed(0))  # 20 000 samples
    grid = GridOptions(spacing="trailing") if sampler == "ddim" else GridOptions()
    x0 = draw(sampler, Denoiser(gaussian_model(schedule), schedule), noise, num_steps, grid)
    assert abs(x0.mean().item() - MU) < 0.03 * MU
    assert abs(x0.var().item() - S**2) < var_tol * S**2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_views_agree_x0_at_t_is_d_at_sigma_t(prediction_type):
    schedule = make_schedule("scaled_linear")
    denoiser = Denoiser(gaussian_model(schedule, prediction_type, wobble=0.05), schedule, prediction_type)
    t = torch.tensor([37, 640])
    abar = schedule.alphas_cumprod[t].float()[:, None, None, None]
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = schedule.sigmas[t].float()  # x = x_t/√ᾱ = x_0 + σ ε
    torch.testing.assert_close(denoiser.denoise(x_t / abar.sqrt(), sigma), denoiser.x0(x_t, t), atol=1e-4, rtol=1e-4)
    eps = denoiser.eps(x_t, t)
    torch.testing.assert_close(abar.sqrt() * denoiser.x0(x_t, t) + (1 - abar).sqrt() * eps, x_t, atol=1e-5, rtol=0)


def test_callback_sees_every_step_and_the_last_x():
    seen = []
    denoiser = Denoiser(gaussian_model(make_schedule()), make_schedule())
    out = draw("heun", denoiser, torch.randn(1, 4, 3, 5), 6, callback=lambda i, x, x0: seen.append((i, x)))
    assert [i for i, _ in seen] == list(range(6)) and torch.equal(seen[-1][1], out)


def test_unknown_sampler_and_bad_step_counts_are_clear_errors():
    with pytest.raises(ValueError, match="unknown sampler 'lms'; known samplers: ddpm, ddim, plms, euler"):
        get_sampler("lms")
    denoiser = Denoiser(gaussian_model(make_schedule()), make_schedule())
    for name in DIFFUSION_SAMPLERS:
        with pytest.raises(ValueError, match="num_steps must be"):
            draw(name, denoiser, torch.randn(1, 4, 2, 2), 0)
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'; expected one of: epsilon, v_prediction"):
        Denoiser(gaussian_model(make_schedule()), make_schedule(), "x0")


@pytest.mark.parametrize("name,grid,options", [(name, GridOptions(), {}) for name in DIFFUSION_SAMPLERS] + [
    ("ddim", GridOptions(), {"eta": 0.7}), ("euler_a", GridOptions(karras=True), {})])
def test_with_a_generator_per_item_each_item_is_its_own_generators_alone(name, grid, options):
    """Item k of a batch drawn with generators seeded 10 + k equals the batch of one drawn with seed 10 + k: the
    stochastic samplers' step noise too (A1111's seed + k per image)."""
    schedule = make_schedule()
    denoiser = Denoiser(gaussian_model(schedule, wobble=0.05), schedule)

    def with_seeds(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn((1, 4, 3, 5), generator=g) for g in generators])
        return draw(name, denoiser, noise, 4, grid, generator=generators, **options)

    batch = with_seeds([10, 11, 12])
    for k in range(3):
        torch.testing.assert_close(batch[k:k + 1], with_seeds([10 + k]), atol=1e-6, rtol=0)


def test_a1111_sampler_names_resolve_in_any_case_and_karras_is_a_suffix():
    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", True)
    assert resolve_sampler("euler A") == ("euler_a", False)
    assert [resolve_sampler(n)[0] for n in ("Euler", "Heun", "DDIM", "PLMS", "DPM++ 2M", "ddpm")] == \
        ["euler", "heun", "ddim", "plms", "dpmpp_2m", "ddpm"]
    assert sampler_label("dpmpp_2m", karras=True) == "DPM++ 2M Karras" and sampler_label("ddpm") == "ddpm"
    assert all(resolve_sampler(sampler_label(n))[0] == n for n in SAMPLERS)
    with pytest.raises(ValueError, match="unknown sampler ''; known samplers: ddim, ddpm"):
        resolve_sampler("")
    with pytest.raises(ValueError, match="ddim has no Karras σ spacing"):
        resolve_sampler("DDIM Karras")
    assert "eta" in sampler_options("ddim") and "eta" not in sampler_options("euler")
