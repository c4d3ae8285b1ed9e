"""SDXL base and refiner on tiny random weights: every format reads back what was written, and text-to-image (with
micro-conditioning, and base + refiner handing over in latent space) equals diffusers' SDXL pipelines."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_parts, tiny_sdxl_parts
from latent_diffusion.conditioning.sdxl import fourier_features
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny base and refiner written as diffusers folders."""
    root = tmp_path_factory.mktemp("sdxl")
    save_model(tiny_sdxl_parts(), root / "base", "diffusers")
    save_model(tiny_sdxl_parts(refiner=True, seed=7), root / "refiner", "diffusers")
    return root / "base", root / "refiner"


@pytest.fixture(scope="module")
def pipes(folders):
    return tuple(Pipeline.from_pretrained(folder, device="cpu") for folder in folders)


def _theirs(cls, folder, scheduler):
    pipe = cls.from_pretrained(folder)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("refiner", [False, True])
@pytest.mark.parametrize("fmt", ["native", "original", "diffusers"])
def test_every_format_reads_back_what_was_written(tmp_path, refiner, fmt):
    parts = tiny_sdxl_parts(refiner=refiner)
    path = tmp_path / ("model.safetensors" if fmt == "original" else "model")
    save_model(parts, path, fmt)
    back = load_model(path)
    if fmt == "original":  # the file says nothing of the training size or our sampling defaults
        assert back.resolution == 1024 and back.sampling.sampler == "euler"
        back.resolution, back.sampling = parts.resolution, parts.sampling
        assert back.unet_config.depth(1) == parts.unet_config.depth(1)  # (1, 2) reads as 2: the same network
        back.unet_config = parts.unet_config
    assert_same_parts(parts, back)
    assert back.conditioning.micro_conditioning == ("aesthetic" if refiner else "size")


def test_text_encoders_and_pooled_output_equal_diffusers(folders, pipes):
    """Tokens: both encoders' penultimate states concatenated; vector: bigG's projected pooled output, then the
    Fourier features of the sizes; ∅ (no negative prompt) is zeros, as force_zeros_for_empty_prompt."""
    theirs = _theirs(diffusers.StableDiffusionXLPipeline, folders[0], diffusers.EulerDiscreteScheduler)
    tokens, negative, pooled, negative_pooled = theirs.encode_prompt(["a red circle", "two blue squares"],
                                                                     do_classifier_free_guidance=True)
    micro = {"original_size": (128, 96), "crop": (4, 8)}
    cond, uncond = pipes[0].conditioner.encode_request(["a red circle", "two blue squares"], None, (64, 64), micro)
    assert torch.allclose(cond.tokens, tokens, atol=1e-5) and tokens.shape[-1] == 64
    assert torch.allclose(cond.vector[:, :16], pooled, atol=1e-5)
    assert torch.equal(uncond.tokens, negative) and not negative.any() and not negative_pooled.any()
    ids = theirs._get_add_time_ids((128, 96), (4, 8), (64, 64), torch.float32, 16)
    assert torch.allclose(cond.vector[:, 16:], fourier_features(ids).expand(2, -1))
    assert torch.allclose(uncond.vector[:, 16:], cond.vector[:, 16:])  # ∅ keeps the request's sizes


@pytest.mark.parametrize("sampler,scheduler", [("euler", "EulerDiscreteScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_text_to_image_equals_diffusers(folders, pipes, sampler, scheduler):
    theirs = _theirs(diffusers.StableDiffusionXLPipeline, folders[0], getattr(diffusers, scheduler))
    micro = {"original_size": (128, 96), "crop": (4, 8), "target_size": (48, 64)}
    ours = pipes[0].generate_tensors(["a red circle", "two blue squares"], negative_prompt="green", steps=5,
                                     sampler=sampler, seed=3, micro=micro, progress=False, **SIZE)
    images = theirs(["a red circle", "two blue squares"], negative_prompt=["green"] * 2, num_inference_steps=5,
                    guidance_scale=5.0, original_size=(128, 96), crops_coords_top_left=(4, 8), target_size=(48, 64),
                    generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="pt", **SIZE).images
    assert torch.allclose((ours + 1) / 2, images, atol=1e-4)
    plain = pipes[0].generate_tensors("a red circle", negative_prompt="green", steps=5, sampler=sampler, seed=3,
                                      progress=False, **SIZE)
    assert (plain[0] - ours[0]).abs().max() > 1e-2  # the micro-conditioning reaches the image


@pytest.mark.parametrize("sampler,scheduler", [("euler", "EulerDiscreteScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_base_and_refiner_equal_diffusers_denoising_end_and_start(folders, pipes, sampler, scheduler):
    """The base runs the steps at t ≥ 200 (denoising_end 0.8) and hands its latents to the refiner, which runs the
    rest (denoising_start 0.8) with its own encoder, aesthetic scores and decoder."""
    base = _theirs(diffusers.StableDiffusionXLPipeline, folders[0], getattr(diffusers, scheduler))
    refiner = _theirs(diffusers.StableDiffusionXLImg2ImgPipeline, folders[1], getattr(diffusers, scheduler))
    micro = {"original_size": (128, 96), "aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
    ours = pipes[0].generate_tensors("a red circle", negative_prompt="green", steps=10, sampler=sampler, seed=3,
                                     micro=micro, refiner=pipes[1], refiner_start=0.8, progress=False, **SIZE)
    generator = torch.Generator().manual_seed(3)
    latents = base("a red circle", negative_prompt="green", num_inference_steps=10, guidance_scale=5.0,
                   original_size=(128, 96), denoising_end=0.8, generator=generator, output_type="latent",
                   **SIZE).images
    images = refiner("a red circle", negative_prompt="green", image=latents, num_inference_steps=10,
                     guidance_scale=5.0, original_size=(128, 96), aesthetic_score=7.0, negative_aesthetic_score=2.0,
                     denoising_start=0.8, generator=generator, output_type="pt").images
    assert torch.allclose((ours + 1) / 2, images, atol=1e-4)
    alone = pipes[0].generate_tensors("a red circle", negative_prompt="green", steps=10, sampler=sampler, seed=3,
                                      micro=micro, progress=False, **SIZE)
    assert (alone - ours).abs().max() > 1e-2  # the refiner did the last steps


def test_handing_over_to_itself_changes_nothing(pipes):
    kwargs = dict(steps=6, sampler="euler", seed=1, progress=False, **SIZE)
    steps = []
    alone = pipes[0].generate_tensors("a red circle", **kwargs)
    handed = pipes[0].generate_tensors("a red circle", refiner=pipes[0], refiner_start=0.5,
                                       on_step=lambda done, total, _: steps.append((done, total)), **kwargs)
    assert torch.equal(alone, handed)
    assert steps == [(k, 6) for k in range(1, 7)]  # one count over both models


def test_bad_sdxl_requests_are_clear_errors(pipes, bundled_pipe):
    base, refiner = pipes
    with pytest.raises(ValueError, match="original_size = .*two integers"):
        base.generate_tensors("x", steps=2, micro={"original_size": (64,)}, progress=False, **SIZE)
    with pytest.raises(ValueError, match="orignal_size: not an SDXL micro-conditioning option"):
        base.generate_tensors("x", steps=2, micro={"orignal_size": (64, 64)}, progress=False, **SIZE)
    with pytest.raises(ValueError, match="original_size: only SDXL models take micro-conditioning"):
        bundled_pipe.generate_tensors("x", steps=2, micro={"original_size": (64, 64)}, progress=False)
    with pytest.raises(ValueError, match="refiner_start = 0.999: with 4 steps one model would run them all"):
        base.generate_tensors("x", steps=4, refiner=refiner, refiner_start=0.999, progress=False, **SIZE)
    with pytest.raises(ValueError, match="refiner: its latents"):
        base.generate_tensors("x", steps=4, refiner=bundled_pipe, progress=False, **SIZE)
    with pytest.raises(ValueError, match="SDXL model's conditions need the image's size"):
        base.conditioner.encode_prompts(["x"])


def test_unsupported_families_are_refused_by_name(tmp_path):
    parts = tiny_sdxl_parts()
    save_model(parts, tmp_path / "xl.safetensors", "original")
    from latent_diffusion.files.weights import load_weights, save_weights
    tensors = {k: v for k, v in load_weights(tmp_path / "xl.safetensors").items()
               if not k.startswith("conditioner.")}
    save_weights(tensors, tmp_path / "unclip.safetensors")
    with pytest.raises(CheckpointError, match="vector-conditioned UNet .*not supported .*SDXL"):
        load_model(tmp_path / "unclip.safetensors")


def test_transformer_families_are_refused_by_name(tmp_path):
    from latent_diffusion.files.weights import save_weights
    save_weights({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
                 tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="is a FLUX checkpoint .*not supported; supported: Stable Diffusion "
                                              "1.x, 2.x, SDXL and SD3"):
        load_model(tmp_path / "flux.safetensors")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(
        '{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}')
    from latent_diffusion.config import ConfigError
    with pytest.raises(ConfigError, match="FluxPipeline .*is not supported"):
        load_model(tmp_path / "flux")


def test_ldm_generate_with_micro_conditioning_and_a_refiner(folders, tmp_path, monkeypatch):
    """The command line draws what the Python call draws, refiner and size flags included."""
    from latent_diffusion.cli import main
    from latent_diffusion.images import pil_to_tensor
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    main(["generate", "a red circle", "--model", str(folders[0]), "--refiner", str(folders[1]), "--refiner-start",
          "0.6", "--original-size", "96", "128", "--crop", "4", "8", "--aesthetic-score", "7", "--steps", "5",
          "--seed", "2", "--height", "64", "--width", "64", "-o", "xl.png"])
    base, refiner = (Pipeline.from_pretrained(folder, device="cpu") for folder in folders)
    expected = base(["a red circle"], steps=5, seed=2, progress=False, refiner=refiner, refiner_start=0.6,
                    micro={"original_size": (96, 128), "crop": (4, 8), "aesthetic_score": 7.0}, **SIZE)[0]
    assert torch.equal(pil_to_tensor(Image.open("xl.png").convert("RGB")), pil_to_tensor(expected))


def test_adapters_of_sd_unets_are_refused_for_sdxl(pipes, tmp_path):
    for load, what in ((lambda: pipes[0].load_lora(tmp_path / "x.safetensors"), "a LoRA"),
                       (lambda: pipes[0].load_controlnet(tmp_path / "x"), "a ControlNet"),
                       (lambda: pipes[0].load_embedding(tmp_path / "x.pt"), "a textual-inversion embedding")):
        with pytest.raises(ValueError, match=f"{what}: an SDXL model takes none yet"):
            load()
