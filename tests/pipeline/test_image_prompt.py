"""Image prompts on a Pipeline: the images diffusers' StableDiffusionPipeline draws with the same IP-Adapter file,
image encoder, image and scale (base and Plus); the scale per request; unloading; bf16 storage; clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latent_diffusion.config import SamplingConfig
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.pipeline import Pipeline

from conditioning.test_image_prompt import KINDS, diffusers_cross_attention, ip_adapter_state, photo, write_image_encoder
from conftest import TINY_SD1, tiny_original_parts
from formats.test_ip_adapter import write_ip_adapter
from formats.test_lora import diffusers_pipe

transformers = pytest.importorskip("transformers")

PROMPT = "a red cube on a table"
DDIM = SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      prompts=("a cat",), steps=3, guidance_scale=7.5)
OPTIONS = dict(steps=3, guidance_scale=7.5, sampler="ddim", seed=7, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(parts, diffusers folder, image encoder folder, {kind: IP-Adapter file})."""
    parts = dataclasses.replace(tiny_original_parts(TINY_SD1, resolution=32), sampling=DDIM)
    folder = tmp_path_factory.mktemp("sd1-ip")
    write_diffusers(parts, folder)
    widths = diffusers_cross_attention(diffusers_pipe(folder).unet)
    files = {kind: write_ip_adapter(ip_adapter_state(kind, widths, TINY_SD1[0].context_dim, seed=8),
                                    folder / f"{kind}.safetensors") for kind in KINDS}
    return parts, folder, write_image_encoder(folder / "image_encoder", seed=2), files


def theirs_with(folder, encoder, file, scale: float):
    pipe = diffusers_pipe(folder)
    pipe.image_encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(encoder).eval()
    pipe.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name, image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", KINDS)
def test_images_are_those_diffusers_draws_with_the_same_image_prompt(model, kind):
    parts, folder, encoder, files = model
    image = photo(45, 37, seed=3)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    expected = theirs_with(folder, encoder, files[kind], 0.6)(
        PROMPT, height=32, width=32, num_inference_steps=3, guidance_scale=7.5, latents=noise,
        ip_adapter_image=image, output_type="pt").images
    ours = Pipeline.from_parts(parts, device="cpu")
    plain = (ours.generate_tensors(PROMPT, **OPTIONS) + 1) / 2
    ours.load_ip_adapter(files[kind], encoder, scale=0.6)
    got = (ours.generate_tensors(PROMPT, image_prompt=image, **OPTIONS) + 1) / 2
    assert (got - plain).abs().max() > 0.01, "the image prompt hardly changes the image: the test proves nothing"
    assert (got - expected).abs().max() <= 1e-4


def test_the_scale_of_a_request_and_unloading(model):
    parts, _, encoder, files = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    plain = pipe.generate_tensors(PROMPT, **OPTIONS)
    pipe.load_ip_adapter(files["ip-adapter"], encoder, scale=0.6)
    image = photo(40, 40, seed=1)
    assert torch.equal(pipe.generate_tensors(PROMPT, image_prompt=image, image_prompt_scale=0.0, **OPTIONS), plain)
    at_scale = pipe.generate_tensors(PROMPT, image_prompt=image, image_prompt_scale=0.9, **OPTIONS)
    assert not torch.equal(at_scale, pipe.generate_tensors(PROMPT, image_prompt=image, **OPTIONS))  # 0.6 again
    assert torch.equal(pipe.generate_tensors(PROMPT, **OPTIONS), plain)  # loaded, no image: no image tokens
    pipe.unload_ip_adapter()
    assert torch.equal(pipe.generate_tensors(PROMPT, **OPTIONS), plain)
    with pytest.raises(ValueError, match="image_prompt: no IP-Adapter is loaded"):
        pipe.generate_tensors(PROMPT, image_prompt=image, **OPTIONS)


@pytest.mark.parametrize("math, tolerance", [("0", 0.1), ("1", 0.4)])
def test_an_image_prompt_on_a_bf16_pipeline(model, monkeypatch, math, tolerance):
    """Weights stored in bf16, with fp32 math (layerwise casting) or bf16 math: the adapter's layers follow the
    UNet's."""
    monkeypatch.setenv("LDM_CPU_BF16_MATH", math)
    parts, _, encoder, files = model
    fp32, bf16 = Pipeline.from_parts(parts, device="cpu"), Pipeline.from_parts(parts, device="cpu", precision="bf16")
    assert bf16.math == ("bf16" if math == "1" else "fp32")
    image = photo(40, 40, seed=1)
    for pipe in (fp32, bf16):
        pipe.load_ip_adapter(files["ip-adapter-plus"], encoder, scale=0.8)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    a, b = (pipe.generate_tensors(PROMPT, image_prompt=image, **OPTIONS) for pipe in (fp32, bf16))
    assert (a - b).abs().max() < tolerance


def test_bad_image_prompts_are_clear_errors(model):
    parts, _, encoder, files = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    pipe.load_ip_adapter(files["ip-adapter"], encoder)
    with pytest.raises(ValueError, match="image_prompt: expected a PIL image, or one for each of the 1 images"):
        pipe.generate_tensors(PROMPT, image_prompt=[photo(8, 8), photo(8, 8)], **OPTIONS)
    with pytest.raises(ValueError, match="image_prompt_scale = 50: expected a finite number"):
        pipe.generate_tensors(PROMPT, image_prompt=photo(8, 8), image_prompt_scale=50, **OPTIONS)
