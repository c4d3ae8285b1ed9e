"""The latent diffusion model assembled in memory, and text to image over it: prompt → τ_θ(prompt) →
sampler(CFG(denoiser)) in latent space → decoder → images. `Pipeline` (`pipeline/`) adds loading and saving."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.image_prompt import ImagePrompt, ip_adapter_scale, set_ip_adapter_scale
from latent_diffusion.conditioning.spatial import binary_masks, encode_latents, spatial_kind, with_spatial
from latent_diffusion.config import MAX_NOISE_LEVEL, AutoencoderRunConfig, LDMRunConfig
from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.flow import FlowDenoiser, FlowSchedule
from latent_diffusion.diffusion.guidance import guided_model
from latent_diffusion.diffusion.schedule import build_schedule
from latent_diffusion.generation.control import Control, ControlledNetwork
from latent_diffusion.generation.editing import Start, overlay as overlay_pixels, start_step
from latent_diffusion.generation.preview import GOOD_FIT, LatentPreview
from latent_diffusion.generation.request import (activation_bytes, available_memory, check_guidance, check_num_images,
                                                 check_number, check_side, check_steps, generators, image_seeds)
from latent_diffusion.images import pil_to_tensor, tensor_to_pil, to_8bit
from latent_diffusion.inference.memory import release_free_memory
from latent_diffusion.inference.precision import math_precision
from latent_diffusion.runtime import PRECISIONS, autocast
from latent_diffusion.samplers import SAMPLERS, GridOptions, get_sampler, resolve_sampler, sampler_options
from latent_diffusion.samplers.common import randn
from latent_diffusion.samplers.grid import Grid, grid_from, grid_length, grid_timesteps, grid_until
from latent_diffusion.unet import UNetModel

# How errors name a request's arguments: Python's keywords (`names=` maps them to a caller's own, e.g. CLI flags)
ARGUMENT_NAMES = {"guidance_scale": "guidance scale", "image": "image=", "mask": "mask="}
IMG2IMG_STRENGTH = 0.75  # the share of the steps img2img runs by default (AUTOMATIC1111's denoising strength)
REFINER_START = 0.8  # the share of the denoising an SDXL base does before its refiner (diffusers' example)


@dataclass(frozen=True)
class Settings:
    """A request's sampling settings, the model's defaults filled in and every value checked (`Pipeline.settings`)."""

    steps: int
    guidance_scale: float
    sampler: str  # its registered name
    options: dict = field(default_factory=dict)  # the sampler's own options asked for: eta
    guidance_rescale: float = 0.0
    grid: GridOptions = GridOptions()  # where its steps lie: the model's spacing, offset and last ᾱ; Karras σ's


def _namer(names: Mapping[str, str] | None):
    """name(argument) → how errors call it: `names`, else ARGUMENT_NAMES, else the keyword itself."""
    return lambda key: {**ARGUMENT_NAMES, **(names or {})}.get(key, key)


class LatentDiffusion:
    """A UNet, an autoencoder and a condition encoder with their configs, in memory and ready to sample."""

    def __init__(self, config: LDMRunConfig, unet: UNetModel, autoencoder: AutoencoderKL,
                 ae_config: AutoencoderRunConfig, conditioner: Conditioner, device: torch.device,
                 precision: str = "fp32"):
        self.config, self.unet, self.autoencoder, self.conditioner = config, unet, autoencoder, conditioner
        self.ae_config, self.device, self.precision = ae_config, device, precision
        # bf16 runs its arithmetic in fp32 on CPUs without bf16 matrix units (`inference.precision`)
        self.math = math_precision(precision, device)
        self.schedule = (FlowSchedule(config.diffusion.num_timesteps, config.diffusion.flow_shift)
                         if config.diffusion.objective == "flow" else build_schedule(config.diffusion))
        # Decode in overlapping latent tiles of this size (e.g. 64: 512² pixels for f = 8), for large images in
        # bounded memory; None decodes whole (exact). See `AutoencoderKL.decode_tiled`.
        self.vae_tile: int | None = None
        self.latent_scale = ae_config.model.latent_scale
        self.image_prompt: ImagePrompt | None = None  # an IP-Adapter's image encoder and projection, when loaded
        self._preview: LatentPreview | None = None

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Pictures of (scaled) latents for a progress view: by the linear map fitted to this model's autoencoder
        on first use (`generation.preview`), or by the decoder where that map explains too little of the colours."""
        if self._preview is None:
            self._preview = LatentPreview.fit(self.autoencoder, self.ae_config.model.in_channels, self.device,
                                              self.math)
        if self._preview.r2 >= GOOD_FIT:
            return self._preview(latents)
        with torch.no_grad(), autocast(self.device, self.math):
            latents = self.ae_config.model.from_diffusion(latents.to(self.device))
            return [tensor_to_pil(x) for x in self.decode(latents).float()]

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
        objective = self.config.diffusion.objective
        if get_sampler(sampler).objective != objective:
            fitting = [n for n, spec in SAMPLERS.items() if spec.objective == objective]
            raise ValueError(f"{name('sampler')}: {sampler} samples {get_sampler(sampler).objective} models; this "
                             f"model is a {objective} model (diffusion.objective), sampled by {', '.join(fitting)}")
        karras = named_karras if karras is None else karras
        options = {}
        if eta is not None:
            check_number(eta, 0.0, 1.0, name("eta"), " (0: deterministic, 1: fully stochastic)")
            options["eta"] = eta
        for option in ["karras"] * bool(karras) + list(options):
            if option not in sampler_options(sampler):
                takers = [n for n in SAMPLERS if option in sampler_options(n)]
                raise ValueError(f"{name(option)}: sampler {sampler} takes no {option} (samplers that do: "
                                 f"{', '.join(takers)})")
        grid = GridOptions(s.timestep_spacing, s.steps_offset, bool(karras), s.set_alpha_to_one)
        return Settings(steps, guidance_scale, sampler, options, guidance_rescale, grid)

    def latent_size(self, height: int | None, width: int | None,
                    names: Mapping[str, str] | None = None) -> tuple[int, int]:
        """(h, w) of the latents for an image size (None: the training size), checked against the downsampling."""
        name, f = _namer(names), self.ae_config.model.downsample_factor
        multiple = f * self.config.network.downsample_factor
        height, width = (self.config.data.resolution if side is None else side for side in (height, width))
        why = f"autoencoder f={f} × UNet downsampling {self.config.network.downsample_factor}"
        positions = getattr(self.config.network, "pos_embed_max_size", None)  # an MMDiT's stored position grid
        for key, value in (("height", height), ("width", width)):
            check_side(value, multiple, name(key), why)
            if positions is not None and value > positions * multiple:
                raise ValueError(f"{name(key)} = {value}: this model's MMDiT knows patch positions for images of "
                                 f"at most {positions * multiple} pixels a side (mmdit.pos_embed_max_size = "
                                 f"{positions} patches)")
        return height // f, width // f

    def max_batch_size(self, height: int | None = None, width: int | None = None, guided: bool = True,
                       names: Mapping[str, str] | None = None) -> int:
        """How many images of this size fit in the device's free memory at once (`request.activation_bytes`; a
        large number where the free memory is unknown); a clear error when not even one does."""
        free = available_memory(self.device)
        if free is None:
            return 1 << 20
        h, w = self.latent_size(height, width, names)
        per_image = activation_bytes(self.config.network, self.ae_config.model, (h, w), guided,
                                     PRECISIONS[self.math].itemsize, self.vae_tile)
        if per_image > free:
            name, f = _namer(names), self.ae_config.model.downsample_factor
            tiles = "" if self.vae_tile else f", or decode in tiles ({name('vae_tile')})"
            raise ValueError(f"{name('height')}/{name('width')}: one {h * f}×{w * f} image needs about "
                             f"{per_image / 2**30:.1f} GiB for its activations, more than the {free / 2**30:.1f} GiB "
                             f"free on {self.device}; ask for a smaller size{tiles}")
        return free // per_image

    def check_image_inputs(self, image: bool, mask: bool, strength: bool = False,
                           names: Mapping[str, str] | None = None) -> None:
        """That a request's image, mask and strength fit this model: any model takes an image (img2img) and a mask
        with it (inpainting); a model with a spatial condition needs the inputs that condition reads."""
        name, kind = _namer(names), self.config.conditioning.spatial
        wanted = spatial_kind(kind).inputs if kind != "none" else ()
        given = tuple(key for key, present in (("image", image), ("mask", mask)) if present)
        if mask and not image:
            raise ValueError(f"{name('mask')} without {name('image')}: a mask marks the region of an image to draw "
                             "anew")
        if strength and not image:
            raise ValueError(f"{name('strength')} without {name('image')}: the strength is how much of an image "
                             "to draw anew")
        if kind == "low_res" and (mask or strength):
            extra = name("mask") if mask else name("strength")
            raise ValueError(f"{extra}: this model upscales its {name('image')} (conditioning.spatial = 'low_res'); "
                             "it takes no mask or strength")
        if wanted and given != wanted:
            listed = " and ".join(f"{'an' if key == 'image' else 'a'} {key} ({name(key)})" for key in wanted)
            got = " and ".join(name(key) for key in given) or "neither"
            raise ValueError(f"this model is conditioned on {listed} (conditioning.spatial = '{kind}'), got {got}")

    def output_size(self, image, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """The size asked for, else that of the image edited (rounded down to the multiple the model needs, as
        diffusers does); None for the training size. The image of an upscaling model is the small one: not its."""
        if image is None or self.config.conditioning.spatial == "low_res":
            return height, width
        image_height, image_width = image.size[::-1] if isinstance(image, Image.Image) else image.shape[-2:]
        multiple = self.ae_config.model.downsample_factor * self.config.network.downsample_factor
        return (height or max(multiple, image_height - image_height % multiple),
                width or max(multiple, image_width - image_width % multiple))

    def image_inputs(self, image, mask, num_images: int, latent_size: tuple[int, int]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(images (N, C, H, W) in [-1, 1], masks (N, 1, H, W) in [0, 1]) of a request on the device, the images at
        the output's size (an upscaling model's as given), None where not given."""
        if image is None:
            return None, None
        f, channels = self.ae_config.model.downsample_factor, self.ae_config.model.in_channels
        size = None if self.config.conditioning.spatial == "low_res" else (latent_size[0] * f, latent_size[1] * f)
        if isinstance(image, Image.Image):
            image = to_8bit(image).convert("L" if channels == 1 else "RGB")
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] != channels:
            raise ValueError(f"image has {image.shape[1]} channels: this model's images have {channels}")
        images = _batch(image, num_images, size, "image").to(self.device)
        masks = None if mask is None else _batch(mask, num_images, size, "mask", is_mask=True).to(self.device)
        return images, masks

    def spatial_input(self, images: torch.Tensor | None, masks: torch.Tensor | None, latent_size: tuple[int, int],
                      generator: list[torch.Generator], noise_level: int | None = None) -> torch.Tensor | None:
        """The spatial condition of a request's images and masks (None for models without one); latents in it are
        sampled from the posterior, and a noise-augmented image noised, with each image's generator (as diffusers
        does)."""
        spatial = spatial_kind(self.config.conditioning.spatial)
        if spatial is None:
            return None
        with autocast(self.device, self.math):
            condition = spatial.condition(images, latent_size, self.autoencoder, masks, generator, noise_level)
        return condition.float()

    def noise_level(self, level: int | None) -> int | None:
        """The augmentation level of a request: the one asked for, else the model's (None: not augmented)."""
        own = self.config.conditioning.noise_level
        if level is None:
            return own
        if own is None:
            raise ValueError(f"noise_level = {level}: this model's low-resolution input is not noise-augmented")
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_NOISE_LEVEL:
            raise ValueError(f"noise_level = {level}: expected an integer from 0 to {MAX_NOISE_LEVEL}")
        return level

    def with_image_prompt(self, cond: Conditioning, uncond: Conditioning,
                          image_prompt: Image.Image | Sequence[Image.Image]) -> tuple[Conditioning, Conditioning]:
        """The conditions with the IP-Adapter's tokens of `image_prompt` (one image for every output, or one
        each) and its null image prompt (diffusers' zero image embedding) for ∅."""
        n = cond.batch_size
        if self.image_prompt is None:
            raise ValueError("image_prompt: no IP-Adapter is loaded (Pipeline.load_ip_adapter; --ip-adapter)")
        images = [image_prompt] if isinstance(image_prompt, Image.Image) else list(image_prompt)
        if len(images) not in (1, n) or not all(isinstance(image, Image.Image) for image in images):
            raise ValueError(f"image_prompt: expected a PIL image, or one for each of the {n} images")
        name = self.image_prompt.name
        tokens = self.image_prompt.tokens(images).float().to(self.device).expand(n, -1, -1)
        return (cond.with_extra(name, tokens),
                uncond.with_extra(name, self.image_prompt.unconditional(n).float().to(self.device)))

    @contextlib.contextmanager
    def image_prompt_scale(self, scale: float | None) -> Iterator[None]:
        """Within: the IP-Adapter's layers at `scale` (None: as loaded); after: as they were."""
        if scale is None:
            yield
            return
        if self.image_prompt is None:
            raise ValueError("image_prompt_scale: no IP-Adapter is loaded (Pipeline.load_ip_adapter; --ip-adapter)")
        check_number(scale, -10.0, 10.0, "image_prompt_scale", " (IP-Adapter's λ; 1: as trained, 0: off)")
        was = ip_adapter_scale(self.unet, self.image_prompt.name)
        set_ip_adapter_scale(self.unet, scale, self.image_prompt.name)
        try:
            yield
        finally:
            set_ip_adapter_scale(self.unet, was, self.image_prompt.name)

    def check_controls(self, controls: Sequence[Control], latent_size: tuple[int, int]) -> None:
        """Each control's settings in range and its image at the output's size (a clear error otherwise)."""
        f = self.ae_config.model.downsample_factor
        size = (latent_size[0] * f, latent_size[1] * f)
        for k, control in enumerate(controls):
            control.check(f"controls[{k}].{{}}".format)
            image = control.image
            if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"controls[{k}].image: expected a tensor (1 or N, 3, H, W) in [0, 1], got {got}")
            if tuple(image.shape[-2:]) != size:
                raise ValueError(f"controls[{k}].image is {image.shape[-1]}×{image.shape[-2]}: expected the output's "
                                 f"{size[1]}×{size[0]} (prepare it at that size: conditioning.control_images)")

    def strength(self, image: bool, mask: bool, strength: float | None) -> float | None:
        """The strength a request runs at: the one asked for, else 1 for inpainting and IMG2IMG_STRENGTH for
        img2img; None without an image to start from (an upscaling model's image is its condition)."""
        if not image or self.config.conditioning.spatial == "low_res":
            return None
        return strength if strength is not None else 1.0 if mask else IMG2IMG_STRENGTH

    def start(self, images: torch.Tensor | None, masks: torch.Tensor | None, strength: float | None, steps: int,
              generator: list[torch.Generator], noise_shape: tuple[int, ...]) -> tuple[torch.Tensor, Start | None]:
        """(the noise, where sampling starts from the image or None) of a request. The generators draw, per image,
        the image's posterior sample first, then the noise (diffusers' order). Plain models edit their image
        (img2img; inpainting by latent blending where a mask is given); an inpainting model starts from its image
        only below strength 1."""
        kind, strength = self.config.conditioning.spatial, self.strength(images is not None, masks is not None,
                                                                           strength)
        if strength is None or (kind == "inpaint" and strength == 1.0):
            return randn(noise_shape, generator), None
        step = start_step(steps, strength)
        with autocast(self.device, self.math):
            latents = encode_latents(self.autoencoder, images, generator).float()
        noise = randn(noise_shape, generator)
        blend = None if masks is None or kind == "inpaint" else binary_masks(masks, latents.shape[-2:])
        return noise, Start(latents, noise.to(self.device), blend, step)

    @torch.no_grad()
    def generate_tensors(self, prompt: str | Sequence[str], negative_prompt: str | None = None,
                         steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                         seed: int = 0, num_images: int = 1, height: int | None = None, width: int | None = None,
                         guidance_rescale: float = 0.0, progress: bool = True,
                         image: torch.Tensor | Image.Image | None = None,
                         mask: torch.Tensor | Image.Image | None = None, eta: float | None = None,
                         karras: bool | None = None, strength: float | None = None,
                         overlay: bool = True, controls: Sequence[Control] = (), guess_mode: bool = False,
                         image_prompt: Image.Image | Sequence[Image.Image] | None = None,
                         image_prompt_scale: float | None = None, noise_level: int | None = None,
                         on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                         micro: Mapping[str, Any] | None = None, refiner: LatentDiffusion | None = None,
                         refiner_start: float = REFINER_START) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1]; the same arguments and seed always give the same images.

        `prompt` is one prompt (drawn `num_images` times) or a list of prompts (one image each). Image k is drawn
        with seed + k alone (its initial and its sampler's noise), so any image of a batch is redrawn alone with
        its seed. `sampler`, `eta` and `karras` as in `settings`.

        `image` (PIL, or a tensor (1 or N, C, H, W) in [-1, 1]) is the image to start from (img2img, `strength`
        default 0.75: the share of the steps run), with `mask` (white / 1 = region to draw anew; masks in [0, 1])
        the image to inpaint (`strength` default 1; the kept pixels pasted back unless `overlay` is False); the
        output has the image's size unless `height`/`width` say otherwise. A model with a spatial condition reads
        them as that condition (low_res: the low-resolution image; inpaint: the image and mask to fill in).

        `controls` are ControlNets with their control images at the output's size (`generation.control.Control`);
        in `guess_mode` they see the conditional branch of guidance only, their residuals scaled up by depth.
        `image_prompt` (one image, or one per output image) is read by the loaded IP-Adapter at its scale, or at
        `image_prompt_scale` for this request. `noise_level` overrides a noise-augmented upscaler's
        (`conditioning.noise_level`). `on_step(done, total, denoised)` is called after every sampling step with the
        step's prediction of the clean latents (a server's progress and previews, `self.preview(denoised)`); an
        exception it raises stops the request there.

        SDXL models read `micro` (`conditioning.sdxl.micro_conditions`: original_size, crop, target_size as
        (height, width) / (top, left), aesthetic_score, negative_aesthetic_score; unset: the output's size, no crop,
        6 and 2.5). With a `refiner` (another SDXL model, e.g. the refiner, sharing this one's latent space), this
        model denoises the steps at timesteps ≥ (1 − refiner_start)·T and the refiner the rest, from this model's
        latents, with the same prompts and sampler, and decodes (diffusers' `denoising_end`/`denoising_start`).
        """
        settings = self.settings(steps, guidance_scale, sampler, eta, karras, guidance_rescale)
        self.check_image_inputs(image is not None, mask is not None, strength is not None)
        check_num_images(num_images)
        height, width = self.output_size(image, height, width)
        h, w = self.latent_size(height, width)
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        num_images = len(prompts)
        check_num_images(num_images, name="number of prompts")
        f = self.ae_config.model.downsample_factor
        if controls and (self.config.backbone != "unet" or self.config.unet.adm_in_channels is not None):
            raise ValueError("controls: ControlNets for SDXL and DiT models are not supported yet")
        seeds = image_seeds(seed, num_images)
        fits = self.max_batch_size(height, width, guided=settings.guidance_scale not in (0.0, 1.0))
        if num_images > fits:
            raise ValueError(f"num_images = {num_images}: only about {fits} images of this size fit in the free "
                             f"memory of {self.device} at once; generate them in batches of at most {fits}")
        release_free_memory()  # what loading and storing the weights left behind
        negatives = None if negative_prompt is None else [negative_prompt] * num_images
        cond, uncond = self.conditioner.encode_request(prompts, negatives, (h * f, w * f), micro)
        handoff = None
        if refiner is not None:
            self.check_refiner(refiner, image is not None or controls or image_prompt is not None)
            refined = refiner.conditioner.encode_request(prompts, negatives, (h * f, w * f), micro)
            handoff = Handoff(refiner.denoiser(refiner.guided(*refined, settings)), refiner, refiner_start)
        if image_prompt is not None:
            cond, uncond = self.with_image_prompt(cond, uncond, image_prompt)
        images, masks = self.image_inputs(image, mask, num_images, (h, w))
        generator = generators(seeds)
        level = self.noise_level(noise_level)
        # the generators draw in diffusers' order: an upscaler's augmentation noise before the latents' noise, an
        # inpainting model's masked-image latents after it
        early = self.config.conditioning.spatial == "low_res"
        spatial = self.spatial_input(images, masks, (h, w), generator, level) if early else None
        noise, start = self.start(images, masks, strength, settings.steps, generator,
                                  (num_images, self.ae_config.model.embed_dim, h, w))
        spatial = spatial if early else self.spatial_input(images, masks, (h, w), generator)
        labels = None if level is None else torch.full((num_images,), level, dtype=torch.long, device=self.device)
        network = with_spatial(self.network, spatial, labels)
        if controls:
            self.check_controls(controls, (h, w))
            branches = {0.0: ("uncond",), 1.0: ("cond",)}.get(settings.guidance_scale, ("uncond", "cond"))
            network = ControlledNetwork(network, controls, branches, guess_mode, labels)
        model = guided_model(network, cond, uncond, settings.guidance_scale, guidance_rescale)
        with self.image_prompt_scale(image_prompt_scale):
            out = self.sample(self.denoiser(model), settings, noise,
                              generator, start, from_noise=masks is not None and strength in (None, 1.0),
                              progress=progress, controlled=network if controls else None, on_step=on_step,
                              handoff=handoff)
        if masks is not None and overlay:
            out = overlay_pixels(out, images.float(), masks.float())
        return out.float().clamp(-1, 1).cpu()

    def sample(self, denoiser: Denoiser, settings: Settings, noise: torch.Tensor, generator: list[torch.Generator],
               start: Start | None = None, from_noise: bool = True, progress: bool = True,
               controlled: ControlledNetwork | None = None,
               on_step: Callable[[int, int, torch.Tensor], None] | None = None,
               handoff: Handoff | None = None) -> torch.Tensor:
        """Decoded images of the sampler's latents: from `noise` over the whole grid, or from an image (`start`);
        `controlled` (the ControlNets' wrapper of the network) counts the steps that run; with a `handoff` the
        refiner runs the grid's last steps and decodes."""
        sampler = get_sampler(settings.sampler)
        grid = sampler.make_grid(self.schedule, settings.steps, settings.grid)
        x, blend = noise.to(self.device), None
        if start is not None:
            grid, x = start.begin(grid, from_noise)
            blend = start.blending(grid)
        total = grid_length(grid)
        stages = [(self, denoiser, grid)] if handoff is None else handoff.stages(self, denoiser, grid)
        bar = tqdm(total=total, desc="sampling", disable=not progress)
        if controlled is not None:
            controlled.begin(total)
        done = 0

        def callback(i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor | None:
            bar.update(1)
            if controlled is not None:
                controlled.advance()
            if on_step is not None:
                on_step(done + i + 1, total, denoised)
            return None if blend is None else blend(i, x, denoised)

        for model, stage_denoiser, stage_grid in stages:
            # One autocast region around every step: autocast keeps its bf16/fp16 copies of the weights until the
            # outermost region ends, so the UNet's weights are cast once per image, not once per step.
            with autocast(model.device, model.math):
                x = sampler.sample(stage_denoiser, x.to(model.device), stage_grid, generator=generator,
                                   callback=callback, **settings.options)
            done += grid_length(stage_grid)
        bar.close()
        release_free_memory()  # the UNet's activations: the decoder's are of other sizes
        with autocast(model.device, model.math):
            return model.decode(model.ae_config.model.from_diffusion(x.float())).float()

    def denoiser(self, model) -> Denoiser | FlowDenoiser:
        """D(x; σ) of a (guided) network function: the VP process's, or a flow model's."""
        if isinstance(self.schedule, FlowSchedule):
            return FlowDenoiser(model, self.schedule)
        return Denoiser(model, self.schedule, self.config.diffusion.prediction_type)

    def guided(self, cond: Conditioning, uncond: Conditioning, settings: Settings):
        """This model's network under classifier-free guidance at the request's settings."""
        return guided_model(self.network, cond, uncond, settings.guidance_scale, settings.guidance_rescale)

    def check_refiner(self, refiner: LatentDiffusion, edits: bool) -> None:
        """A clear error for a refiner that cannot take over this model's latents, or a request it cannot refine."""
        mine, theirs = self.ae_config.model, refiner.ae_config.model
        if edits:
            raise ValueError("refiner: only text-to-image requests are refined (no image, mask, controls or image "
                             "prompt)")
        if (mine.embed_dim, mine.downsample_factor) != (theirs.embed_dim, theirs.downsample_factor):
            raise ValueError(f"refiner: its latents ({theirs.embed_dim} channels, f={theirs.downsample_factor}) are not "
                             f"this model's ({mine.embed_dim} channels, f={mine.downsample_factor})")
        if type(refiner.schedule) is not type(self.schedule) or (
                isinstance(self.schedule, FlowSchedule) and refiner.schedule != self.schedule) or (
                not isinstance(self.schedule, FlowSchedule) and not torch.equal(refiner.schedule.alphas_cumprod,
                                                                                self.schedule.alphas_cumprod)):
            raise ValueError("refiner: its noise schedule differs from this model's; the handover needs one schedule")

    def network(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """ε_θ(x, t, condition) in fp32, the UNet run at the math precision."""
        with autocast(self.device, self.math):
            return self.unet(x, t, **kwargs).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from (unscaled) latents: whole, or in tiles when `vae_tile` is set."""
        if self.vae_tile and isinstance(self.autoencoder, AutoencoderKL):
            return self.autoencoder.decode_tiled(latents, self.vae_tile)
        return self.autoencoder.decode(latents)

    def __call__(self, prompt: str | Sequence[str], **kwargs) -> list[Image.Image]:
        """PIL images for `prompt`; keyword arguments as in `generate_tensors`."""
        return [tensor_to_pil(x) for x in self.generate_tensors(prompt, **kwargs)]


@dataclass(frozen=True)
class Handoff:
    """A second model (SDXL's refiner) taking over the sampling at `start` ∈ (0, 1): the first model runs the grid's
    steps at timesteps t ≥ round((1 − start)·T), the second the rest (diffusers' `denoising_end` and
    `denoising_start`), then decodes."""

    denoiser: Denoiser
    model: LatentDiffusion
    start: float

    def split(self, grid: Grid, schedule) -> int:
        """How many of `grid`'s steps the first model runs."""
        check_number(self.start, 0.0, 1.0, "refiner_start", " (the share of the denoising the base model does)")
        cutoff = round(schedule.num_timesteps * (1 - self.start))
        return sum(1 for t in grid_timesteps(grid, schedule) if round(t, 3) >= cutoff)

    def stages(self, first: LatentDiffusion, denoiser: Denoiser, grid: Grid) -> list[tuple]:
        k = self.split(grid, first.schedule)
        if k in (0, grid_length(grid)):
            raise ValueError(f"refiner_start = {self.start}: with {grid_length(grid)} steps one model would run them "
                             "all; move refiner_start into (0, 1) or take more steps")
        return [(first, denoiser, grid_until(grid, k)), (self.model, self.denoiser, grid_from(grid, k))]


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
