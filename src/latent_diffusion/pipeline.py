"""Text to image: prompt → τ_θ(prompt) → sampler(CFG(denoiser)) in latent space → decoder → images.

A model folder (what `ldm train` writes) holds `config.yaml`, `unet.safetensors` (EMA weights when trained with
EMA), `autoencoder/` (the frozen first stage with its latent scale) and, for class-conditional models,
`conditioner.safetensors`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL, build_autoencoder
from latent_diffusion.autoencoder.bands import inference_bands
from latent_diffusion.backends import check_backend
from latent_diffusion.conditioning.adapter import ContextAdapter
from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.registry import build_encoder
from latent_diffusion.conditioning.spatial import check_spatial, spatial_condition, with_spatial
from latent_diffusion.config import AutoencoderRunConfig, ConditioningConfig, DataConfig, DiffusionConfig, LDMRunConfig
from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.guidance import guided_model
from latent_diffusion.diffusion.schedule import NoiseSchedule, make_schedule
from latent_diffusion.images import pil_to_tensor, save_image, tensor_to_pil, to_8bit
from latent_diffusion.io.checkpoint import CheckpointError, load_module_weights, module_from_weights
from latent_diffusion.io.model import (AUTOENCODER_DIR, CONDITIONER_FILE, CONFIG_FILE, UNET_FILE,  # noqa: F401
                                       ModelParts, load_model)
from latent_diffusion.outputs import check_writable, image_paths, output_file
from latent_diffusion.request import (activation_bytes, available_memory, check_guidance, check_num_images,
                                     check_number, check_side, check_steps, generators, image_seeds)
from latent_diffusion.runtime import (PRECISIONS, autocast, channels_last_on_cpu, check_precision, math_precision,
                                     release_free_memory, resolve_device, store_weights)
from latent_diffusion.samplers import SAMPLERS, get_sampler, resolve_sampler, sampler_options
from latent_diffusion.samplers.common import randn
from latent_diffusion.unet import UNetModel

# How errors name a request's arguments: Python's keywords (`names=` maps them to a caller's own, e.g. CLI flags)
ARGUMENT_NAMES = {"guidance_scale": "guidance scale", "image": "image=", "mask": "mask="}


class Conditioner:
    """The condition encoder of a model, with one interface for captions, class labels and prompts.

    `encoder` is the frozen text encoder or the class embedder; `adapter` (text models with
    `conditioning.adapter_layers`) is the trained `ContextAdapter` applied to the encoder's tokens.
    """

    def __init__(self, cfg: ConditioningConfig, encoder: torch.nn.Module, adapter: ContextAdapter | None = None):
        self.cfg, self.encoder, self.adapter = cfg, encoder, adapter
        self.dim: int = encoder.dim

    @property
    def trainable(self) -> torch.nn.Module | None:
        """The module trained with the UNet (the class embedder or the adapter), or None."""
        return self.encoder if self.cfg.encoder == "class" else self.adapter

    def adapt(self, cond: Conditioning) -> Conditioning:
        """The adapter applied to frozen text tokens (identity without one)."""
        return cond if self.adapter is None else self.adapter(cond)

    def encode_items(self, items: Sequence[dict], adapt: bool = True) -> Conditioning:
        """Conditions of dataset items ({'caption': str, 'label': int}); `adapt=False`: the frozen tokens."""
        if self.cfg.encoder == "class":
            return self.encoder([item["label"] for item in items])
        cond = self.encoder([item["caption"] for item in items])
        return self.adapt(cond) if adapt else cond

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditions of user prompts; a class-conditional model's prompt names its class (`class_label`)."""
        if self.cfg.encoder != "class":
            return self.adapt(self.encoder(list(prompts)))
        return self.encoder([class_label(p, self.cfg) for p in prompts])

    def unconditional(self, batch_size: int, adapt: bool = True) -> Conditioning:
        """∅, `batch_size` times; `adapt=False`: a text model's frozen tokens of the empty prompt."""
        cond = self.encoder.unconditional(batch_size)
        return self.adapt(cond) if adapt and self.cfg.encoder != "class" else cond


def class_label(prompt: str, cfg: ConditioningConfig) -> int:
    """The label a class-conditional model's prompt asks for: its number, or the longest class name it contains
    ("a photo of a t-shirt" is a t-shirt, not a shirt)."""
    text = prompt.strip().lower()
    if text.isdigit() and int(text) < cfg.num_classes:
        return int(text)
    names = cfg.class_names or ()
    found = [(len(name), label) for label, name in enumerate(names) if name.lower() in text]
    if not found:
        known = f"a class name ({', '.join(names)}) or " if names else ""
        raise ValueError(f"this model is class-conditional: the prompt must be {known}a label number 0 to "
                         f"{cfg.num_classes - 1}, got {prompt!r}")
    return max(found)[1]


def build_conditioner(cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
                      text_weights: Mapping[str, torch.Tensor] | None = None,
                      dtype: torch.dtype = torch.float32) -> Conditioner:
    """The configured encoder on `device` (`context_dim` sizes a class embedder's tokens); a CLIP text encoder
    holds `text_weights` (None: those at `cfg.path`) in `dtype`."""
    if cfg.encoder == "class":
        if cfg.num_classes is None or context_dim is None:
            raise ValueError("conditioning.encoder = 'class' needs conditioning.num_classes and unet.context_dim")
        encoder = build_encoder("class", num_classes=cfg.num_classes, dim=context_dim)
    elif cfg.encoder == "minilm":
        encoder = build_encoder("minilm", max_length=cfg.max_length, model_path=cfg.path,
                                clause_tokens=cfg.clause_tokens)
    else:
        encoder = build_encoder("clip", config=cfg.clip, weights=cfg.path if text_weights is None else text_weights,
                                dtype=dtype)
    adapter = ContextAdapter(encoder.dim, cfg.adapter_layers).to(device) if cfg.adapter_layers else None
    return Conditioner(cfg, encoder.to(device), adapter)


def _trained_part(cfg: LDMRunConfig) -> str:
    return "class embedder" if cfg.conditioning.encoder == "class" else "text adapter"


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    return make_schedule(cfg.schedule, cfg.num_timesteps, zero_terminal_snr=cfg.zero_terminal_snr)


@dataclass(frozen=True)
class Settings:
    """A request's sampling settings, the model's defaults filled in and every value checked (`Pipeline.settings`)."""

    steps: int
    guidance_scale: float
    sampler: str  # its registered name
    options: dict = field(default_factory=dict)  # what was asked of the sampler beyond its grid: eta, karras
    guidance_rescale: float = 0.0


def _namer(names: Mapping[str, str] | None):
    """name(argument) → how errors call it: `names`, else ARGUMENT_NAMES, else the keyword itself."""
    return lambda key: {**ARGUMENT_NAMES, **(names or {})}.get(key, key)


def _placement(device: str | torch.device, precision: str, backend: str) -> tuple[torch.device, torch.dtype]:
    """The device a pipeline runs on and the dtype it keeps its weights in, both checked."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, dev)
    check_backend(backend, dev)
    return dev, PRECISIONS[precision] if backend == "torch" else torch.float32  # OpenVINO converts fp32


class Pipeline:
    """A trained latent diffusion model, ready to sample: `Pipeline.from_pretrained(folder)(prompt)`."""

    def __init__(self, config: LDMRunConfig, unet: UNetModel, autoencoder: AutoencoderKL,
                 ae_config: AutoencoderRunConfig, conditioner: Conditioner, device: torch.device,
                 precision: str = "fp32", backend: str = "torch"):
        self.config, self.unet, self.autoencoder, self.conditioner = config, unet, autoencoder, conditioner
        self.ae_config, self.device, self.precision = ae_config, device, precision
        # bf16 runs its arithmetic in fp32 on CPUs whose bf16 matmuls are slower (`runtime.math_precision`)
        self.math = math_precision(precision, device)
        check_backend(backend, device)
        self.backend = backend
        self._openvino = None  # the UNet compiled by OpenVINO, made on first use
        self.schedule = build_schedule(config.diffusion)
        # Decode in overlapping latent tiles of this size (e.g. 64: 512² pixels for f = 8), for large images in
        # bounded memory; None decodes whole (exact). See `AutoencoderKL.decode_tiled`.
        self.vae_tile: int | None = None
        self.latent_scale = ae_config.model.latent_scale

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        precision: str = "fp32", backend: str = "torch", **options) -> Pipeline:
        """Load a model in any format: a folder written by `ldm train`, a Stable Diffusion checkpoint file
        (.safetensors / .ckpt) or a diffusers folder; `options` go to the format's reader (see `load_model`).
        `backend="openvino"` runs the UNet through OpenVINO (CPU; `backends/openvino.py`). The weights are read
        straight onto the device and in the dtype they are kept in, each once (`load_model`)."""
        dev, storage = _placement(device, precision, backend)
        return cls.from_parts(load_model(path, dtype=storage, device=dev, **options), dev, precision, backend)

    @classmethod
    def from_parts(cls, parts: ModelParts, device: str | torch.device = "auto", precision: str = "fp32",
                   backend: str = "torch") -> Pipeline:
        """A pipeline of the configs and weights in `parts`. Weights are kept in fp32, or for `precision` bf16 /
        fp16 (backend torch) in that dtype — half the memory — with the math at `runtime.math_precision`. Tensors
        of `parts` already in that dtype and on `device` become the modules' weights themselves, not copies."""
        dev, storage = _placement(device, precision, backend)
        cfg = parts.run_config()
        unet = module_from_weights(lambda: UNetModel(cfg.unet), parts.unet, "UNet weights", storage, dev)
        autoencoder = module_from_weights(lambda: build_autoencoder(parts.autoencoder_config), parts.autoencoder,
                                          "autoencoder weights", storage, dev)
        if parts.text_encoder is not None and cfg.conditioning.encoder != "clip":
            raise CheckpointError(f"text encoder weights given for a '{cfg.conditioning.encoder}' model")
        conditioner = build_conditioner(cfg.conditioning, dev, cfg.unet.context_dim, parts.text_encoder, storage)
        if parts.tokenizer is not None:
            conditioner.encoder.tokenizer = parts.tokenizer
        if conditioner.trainable is not None:
            if parts.conditioner is None:
                raise CheckpointError(f"this model needs the weights of its {_trained_part(cfg)} "
                                      f"({CONDITIONER_FILE})")
            load_module_weights(conditioner.trainable, parts.conditioner, f"{_trained_part(cfg)} weights")
            conditioner.trainable.eval()
        check_spatial(cfg.conditioning.spatial, cfg.unet.concat_channels, parts.autoencoder_config.in_channels,
                      parts.autoencoder_config.embed_dim)
        ae_cfg = AutoencoderRunConfig(model=parts.autoencoder_config, data=DataConfig(resolution=parts.resolution))
        autoencoder = channels_last_on_cpu(autoencoder.to(dev).eval(), dev)
        if isinstance(autoencoder, AutoencoderKL):  # the same images in less memory: `autoencoder/bands.py`
            autoencoder.bands = inference_bands(dev, storage)
        pipe = cls(cfg, unet.to(dev).eval(), autoencoder, ae_cfg, conditioner, dev, precision, backend)
        if storage != torch.float32:
            math = PRECISIONS[pipe.math]
            store_weights(pipe.unet, storage, math)
            store_weights(pipe.autoencoder, storage, math)
            if cfg.conditioning.encoder == "clip":  # its math stays fp32: a small share of the time
                store_weights(conditioner.encoder, storage, torch.float32)
        return pipe

    def settings(self, steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                 eta: float | None = None, karras: bool | None = None, guidance_rescale: float = 0.0,
                 names: Mapping[str, str] | None = None) -> Settings:
        """The model's defaults where None; a sampler by its name or AUTOMATIC1111's ('DPM++ 2M Karras' is dpmpp_2m
        with karras); `eta` and `karras` only for samplers that take them. Errors name arguments by `names`."""
        name, s = _namer(names), self.config.sampling
        steps = s.steps if steps is None else steps
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        check_steps(steps, self.schedule.num_timesteps, name("steps"))
        check_guidance(guidance_scale, name("guidance_scale"))
        check_number(guidance_rescale, 0.0, 1.0, name("guidance_rescale"), " (0: none; 0.7 in Lin et al.)")
        sampler, named_karras = resolve_sampler(s.sampler if sampler is None else sampler)
        options = {"karras": True} if (named_karras if karras is None else karras) else {}
        if eta is not None:
            check_number(eta, 0.0, 1.0, name("eta"), " (0: deterministic, 1: fully stochastic)")
            options["eta"] = eta
        for option in options:
            if option not in sampler_options(sampler):
                takers = [n for n in SAMPLERS if option in sampler_options(n)]
                raise ValueError(f"{name(option)}: sampler {sampler} takes no {option} (samplers that do: "
                                 f"{', '.join(takers)})")
        return Settings(steps, guidance_scale, sampler, options, guidance_rescale)

    def latent_size(self, height: int | None, width: int | None,
                    names: Mapping[str, str] | None = None) -> tuple[int, int]:
        """(h, w) of the latents for an image size (None: the training size), checked against the downsampling."""
        name, f = _namer(names), self.ae_config.model.downsample_factor
        multiple = f * self.config.unet.downsample_factor
        height, width = (self.config.data.resolution if side is None else side for side in (height, width))
        why = f"autoencoder f={f} × UNet downsampling {self.config.unet.downsample_factor}"
        for key, value in (("height", height), ("width", width)):
            check_side(value, multiple, name(key), why)
        return height // f, width // f

    def max_batch_size(self, height: int | None = None, width: int | None = None, guided: bool = True,
                       names: Mapping[str, str] | None = None) -> int:
        """How many images of this size fit in the device's free memory at once (`request.activation_bytes`; a
        large number where the free memory is unknown); a clear error when not even one does."""
        free = available_memory(self.device)
        if free is None:
            return 1 << 20
        h, w = self.latent_size(height, width, names)
        per_image = activation_bytes(self.config.unet, self.ae_config.model, (h, w), guided,
                                     PRECISIONS[self.math].itemsize, self.vae_tile)
        if per_image > free:
            name, f = _namer(names), self.ae_config.model.downsample_factor
            tiles = "" if self.vae_tile else f", or decode in tiles ({name('vae_tile')})"
            raise ValueError(f"{name('height')}/{name('width')}: one {h * f}×{w * f} image needs about "
                             f"{per_image / 2**30:.1f} GiB for its activations, more than the {free / 2**30:.1f} GiB "
                             f"free on {self.device}; ask for a smaller size{tiles}")
        return free // per_image

    def grid_options(self, sampler: str) -> dict:
        """The configured timestep grid settings that `sampler` takes (samplers differ in which they accept)."""
        s = self.config.sampling
        options = {"spacing": s.timestep_spacing, "steps_offset": s.steps_offset,
                   "set_alpha_to_one": s.set_alpha_to_one}
        return {k: v for k, v in options.items() if v is not None and k in sampler_options(sampler)}

    def check_spatial_inputs(self, image: bool, mask: bool, names: Mapping[str, str] | None = None) -> None:
        """That a request gives this model the image (and mask) its spatial condition needs, and no more."""
        name, kind = _namer(names), self.config.conditioning.spatial
        wanted = {"none": (), "low_res": ("image",), "inpaint": ("image", "mask")}[kind]
        given = tuple(key for key, present in (("image", image), ("mask", mask)) if present)
        if given == wanted:
            return
        if not wanted:
            raise ValueError(f"this model has no spatial condition: it takes no {name('image')} or {name('mask')}")
        listed = " and ".join(f"{'an' if key == 'image' else 'a'} {key} ({name(key)})" for key in wanted)
        got = " and ".join(name(key) for key in given) or "neither"
        raise ValueError(f"this model is conditioned on {listed} (conditioning.spatial = '{kind}'), got {got}")

    def spatial_input(self, image, mask, num_images: int, latent_size: tuple[int, int]) -> torch.Tensor | None:
        """The spatial condition of a generation request (None for plain text-to-image models)."""
        kind = self.config.conditioning.spatial
        self.check_spatial_inputs(image is not None, mask is not None)
        if kind == "none":
            return None
        f, channels = self.ae_config.model.downsample_factor, self.ae_config.model.in_channels
        size = (latent_size[0] * f, latent_size[1] * f)
        if isinstance(image, Image.Image):
            image = to_8bit(image).convert("L" if channels == 1 else "RGB")
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] != channels:
            raise ValueError(f"image has {image.shape[1]} channels: this model's images have {channels}")
        images = _batch(image, num_images, size if kind == "inpaint" else None, "image").to(self.device)
        masks = _batch(mask, num_images, size, "mask", is_mask=True).to(self.device) if kind == "inpaint" else None
        with autocast(self.device, self.math):
            spatial = spatial_condition(kind, images, latent_size, self.autoencoder, self.latent_scale, masks)
        return spatial.float()

    @torch.no_grad()
    def generate_tensors(self, prompt: str | Sequence[str], negative_prompt: str | None = None,
                         steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                         seed: int = 0, num_images: int = 1, height: int | None = None, width: int | None = None,
                         guidance_rescale: float = 0.0, progress: bool = True,
                         image: torch.Tensor | Image.Image | None = None,
                         mask: torch.Tensor | Image.Image | None = None, eta: float | None = None,
                         karras: bool | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1]; the same arguments and seed always give the same images.

        `prompt` is one prompt (drawn `num_images` times) or a list of prompts (one image each). Image k is drawn
        with seed + k alone (its initial and its sampler's noise), so any image of a batch is redrawn alone with
        its seed. `sampler`, `eta` and `karras` as in `settings`. A model with a spatial condition takes `image`
        (low_res: the low-resolution image; inpaint: the image to fill in) and, for inpainting, `mask` (white / 1
        = region to generate): PIL images or tensors (1 or N, C, H, W) in [-1, 1] (masks in [0, 1]).
        """
        settings = self.settings(steps, guidance_scale, sampler, eta, karras, guidance_rescale)
        steps, guidance_scale = settings.steps, settings.guidance_scale
        check_num_images(num_images)
        h, w = self.latent_size(height, width)
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        num_images = len(prompts)
        check_num_images(num_images, name="number of prompts")
        seeds = image_seeds(seed, num_images)
        fits = self.max_batch_size(height, width, guided=guidance_scale not in (0.0, 1.0))
        if num_images > fits:
            raise ValueError(f"num_images = {num_images}: only about {fits} images of this size fit in the free "
                             f"memory of {self.device} at once; generate them in batches of at most {fits}")
        release_free_memory()  # what loading and storing the weights left behind
        cond = self.conditioner.encode_prompts(prompts)
        uncond = (self.conditioner.encode_prompts([negative_prompt] * num_images) if negative_prompt is not None
                  else self.conditioner.unconditional(num_images))

        def network(x, t, **kwargs):
            if self.backend == "openvino":
                return self.openvino_unet()(x, t, **kwargs)
            with autocast(self.device, self.math):
                return self.unet(x, t, **kwargs).float()

        spatial = self.spatial_input(image, mask, num_images, (h, w))
        model = guided_model(with_spatial(network, spatial), cond, uncond, guidance_scale, guidance_rescale,
                             shared_latents=True)
        denoiser = Denoiser(model, self.schedule, self.config.diffusion.prediction_type)
        generator = generators(seeds)
        noise = randn((num_images, self.ae_config.model.embed_dim, h, w), generator)
        bar = tqdm(total=steps, desc="sampling", disable=not progress)
        sample = get_sampler(settings.sampler)
        # One autocast region around every step: autocast keeps its bf16/fp16 copies of the weights until the
        # outermost region ends, so the UNet's weights are cast once per image, not once per step.
        with autocast(self.device, self.math):
            latents = sample(denoiser, noise.to(self.device), steps, generator=generator,
                             callback=lambda *_: bar.update(1), **self.grid_options(settings.sampler),
                             **settings.options)
            bar.close()
            release_free_memory()  # the UNet's activations: the decoder's are of other sizes
            images = self.decode(latents.float() / self.latent_scale)
        return images.float().clamp(-1, 1).cpu()

    def openvino_unet(self):
        """The UNet compiled by OpenVINO at this pipeline's precision (made once, kept)."""
        if self._openvino is None:
            from latent_diffusion.backends.openvino import OpenVINOUNet, default_cache_dir
            self._openvino = OpenVINOUNet(self.unet, self.precision, default_cache_dir())
        return self._openvino

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from (unscaled) latents: whole, or in tiles when `vae_tile` is set."""
        if self.vae_tile and isinstance(self.autoencoder, AutoencoderKL):
            return self.autoencoder.decode_tiled(latents, self.vae_tile)
        return self.autoencoder.decode(latents)

    def __call__(self, prompt: str | Sequence[str], **kwargs) -> list[Image.Image]:
        """PIL images for `prompt`; keyword arguments as in `generate_tensors`."""
        return [tensor_to_pil(x) for x in self.generate_tensors(prompt, **kwargs)]

    @staticmethod
    def save(images: list[Image.Image], path: str | os.PathLike,
             parameters: Sequence[str | None] | None = None) -> list[Path]:
        """Write the images atomically as `path`, then path-1, path-2, … (a folder: out.png, … in it; see
        `outputs`), in the format of the extension, each with its parameters text when given; returns the files."""
        files = image_paths(output_file(path), len(images))
        check_writable(files)
        for image, file, text in zip(images, files, parameters or [None] * len(images), strict=True):
            save_image(image, file, text)
        return files


def _batch(value: torch.Tensor | Image.Image, count: int, size: tuple[int, int] | None, name: str,
           is_mask: bool = False) -> torch.Tensor:
    """A PIL image or a (1 or N, C, H, W) tensor as an (N, C, H, W) batch, resized to `size` when given."""
    if isinstance(value, Image.Image):
        value = to_8bit(value).convert("L") if is_mask else value
        value = pil_to_tensor(value)[None]
        value = (value + 1) / 2 if is_mask else value
    if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[0] not in (1, count):
        raise ValueError(f"{name}: expected a PIL image or a tensor of shape (1 or {count}, C, H, W), got "
                         f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    value = value.float().expand(count, -1, -1, -1)
    if size is not None and tuple(value.shape[-2:]) != size:
        value = torch.nn.functional.interpolate(value, size=size, mode="nearest" if is_mask else "bilinear",
                                                antialias=not is_mask)
    return value
