"""Spatial conditions concatenated to z_t (the paper's concatenation conditioning, §3.3).

- "low_res": the image at the latent grid's size (super-resolution by the autoencoder's factor f);
  `image_channels` extra channels.
- "inpaint": Stable Diffusion inpainting's layout: [mask (1 = region to generate), latents of the masked image]
  → 1 + latent channels extra channels, in that order after z_t (so SD inpainting checkpoints run unchanged).

Each kind is a `SpatialCondition` registered by its config name in `SPATIAL_CONDITIONS`: what a request gives for
it, its channels, how it is computed, what training and sample grids feed it. A spatial condition is kept in both
the conditional and the unconditional branch of guidance (as SD does): only the text or class condition is dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.config import ConfigError
from latent_diffusion.diffusion.schedule import NoiseSchedule, scaled_linear_betas
from latent_diffusion.samplers.common import randn

SpatialKind = Literal["none", "low_res", "inpaint"]


# The noise-augmentation schedule of a low-resolution condition (CompVis' ImageConcatWithNoiseAugmentation, "linear"
# 1e-4 … 0.02 over 1000 steps, which is diffusers' "scaled_linear": the x4 upscaler's low_res_scheduler)
LOW_RES_SCHEDULE = ("scaled_linear", 1e-4, 0.02, 1000)
DEFAULT_NOISE_LEVEL = 20  # the x4 upscaler's default augmentation (diffusers' StableDiffusionUpscalePipeline)


def low_res_condition(images: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] resized (area average) to the latent grid: (B, C, h, w)."""
    return F.interpolate(images, size=latent_size, mode="area")


def noise_augmented(images: torch.Tensor, noise_level: int, generators: Sequence[torch.Generator] | None
                    ) -> torch.Tensor:
    """√ᾱ_t·x + √(1 − ᾱ_t)·ε at t = `noise_level` of `LOW_RES_SCHEDULE` (DDPM eq. 4; diffusers'
    `low_res_scheduler.add_noise`), ε drawn from each image's generator."""
    _, beta_start, beta_end, steps = LOW_RES_SCHEDULE
    schedule = NoiseSchedule.from_betas(scaled_linear_betas(steps, beta_start, beta_end))
    alpha_cumprod = schedule.alphas_cumprod[noise_level].item()
    noise = randn(images.shape, None if generators is None else list(generators), images.device, images.dtype)
    return alpha_cumprod**0.5 * images + (1 - alpha_cumprod) ** 0.5 * noise


def random_masks(batch_size: int, height: int, width: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Training masks (B, 1, H, W), 1 = region to generate: a random rectangle covering 10–100 % of each side,
    the whole image for 1 in 8 (plain text-to-image), no mask for 1 in 8 (reconstruction)."""
    masks = torch.zeros(batch_size, 1, height, width)
    u = torch.rand(batch_size, 5, generator=generator)
    for i in range(batch_size):
        if u[i, 0] < 0.125:
            masks[i] = 1.0
        elif u[i, 0] < 0.25:
            continue
        h = max(1, int(height * (0.1 + 0.9 * u[i, 1])))
        w = max(1, int(width * (0.1 + 0.9 * u[i, 2])))
        top, left = int((height - h) * u[i, 3]), int((width - w) * u[i, 4])
        masks[i, :, top:top + h, left:left + w] = 1.0
    return masks


@torch.no_grad()
def encode_latents(autoencoder: AutoencoderKL, images: torch.Tensor,
                   generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Latents of images (B, C, H, W) in [-1, 1] as the diffusion model sees them (shifted and scaled by the
    autoencoder's config): the posterior mean, or with one generator per image a sample of the posterior drawn
    from it (as diffusers' `retrieve_latents` and AUTOMATIC1111 do)."""
    posterior = autoencoder.encode(images)
    if generators is None:
        return autoencoder.config.to_diffusion(posterior.mode())
    noise = randn(posterior.mean.shape, list(generators), posterior.mean.device, posterior.mean.dtype)
    return autoencoder.config.to_diffusion(posterior.mean + posterior.std * noise)


def binary_masks(masks: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Masks (B, 1, H, W) as 0/1 (≥ 0.5: 1, the region to generate), resized to `size` by nearest neighbours."""
    masks = (masks >= 0.5).to(masks.dtype)
    return masks if size is None else F.interpolate(masks, size=size, mode="nearest")


@torch.no_grad()
def inpaint_condition(autoencoder: AutoencoderKL, images: torch.Tensor, masks: torch.Tensor,
                      generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """[mask at the latent grid, scaled latents of the image with the masked region set to 0] (B, 1 + c, h, w);
    the latents sampled from the posterior with `generators` when given (see `encode_latents`)."""
    if masks.shape[-2:] != images.shape[-2:] or masks.shape[1] != 1:
        raise ValueError(f"mask of shape {tuple(masks.shape)}: expected (B, 1, {images.shape[-2]}, "
                         f"{images.shape[-1]}), the image's size")
    masks = binary_masks(masks).to(images.dtype)
    latents = encode_latents(autoencoder, images * (1 - masks), generators)
    return torch.cat([binary_masks(masks, latents.shape[-2:]), latents], dim=1)


class SpatialCondition(ABC):
    """A condition concatenated to z_t: what a generation request gives for it, the channels it adds, how it is
    computed from images, and what training and the sample grids feed it. Registered by config name below."""

    inputs: ClassVar[tuple[str, ...]]  # what a generation request gives: "image", and "mask"
    shown_as: ClassVar[str]  # what a sample grid calls the inputs it shows

    @abstractmethod
    def channels(self, image_channels: int, latent_channels: int) -> int:
        """Channels it adds to the UNet's input."""

    @abstractmethod
    def condition(self, images: torch.Tensor, latent_size: tuple[int, int], autoencoder: AutoencoderKL | None = None,
                  masks: torch.Tensor | None = None,
                  generators: Sequence[torch.Generator] | None = None,
                  noise_level: int | None = None) -> torch.Tensor:
        """The condition (B, channels, h, w) of images (B, C, H, W) in [-1, 1] (and masks, 1 = to generate); latents
        in it sampled from the posterior with `generators` (one per image) when given, else its mean; the image
        noise-augmented to `noise_level` where the kind takes one."""

    def training_masks(self, batch_size: int, height: int, width: int,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The masks (B, 1, H, W) a training batch draws, or None (no randomness drawn)."""
        return None

    @abstractmethod
    def sample_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fixed inputs of a training run's sample grids, from training images (B, C, H, W)."""

    @abstractmethod
    def shown(self, inputs: dict[str, torch.Tensor], latent_size: tuple[int, int]) -> torch.Tensor:
        """What a sample grid shows of its `inputs` (B, C, H', W')."""


class LowResolution(SpatialCondition):
    """The image at the latent grid's size: super-resolution by the autoencoder's factor f."""

    inputs = ("image",)
    shown_as = "low resolution"

    def channels(self, image_channels: int, latent_channels: int) -> int:
        return image_channels

    def condition(self, images, latent_size, autoencoder=None, masks=None, generators=None,
                  noise_level=None):
        small = low_res_condition(images, latent_size)
        return small if noise_level is None else noise_augmented(small, noise_level, generators)

    def sample_inputs(self, images):
        return {"image": images}

    def shown(self, inputs, latent_size):
        return low_res_condition(inputs["image"], latent_size)


class Inpainting(SpatialCondition):
    """[mask, latents of the masked image], SD inpainting's layout; trained on random rectangles."""

    inputs = ("image", "mask")
    shown_as = "masked"

    def channels(self, image_channels: int, latent_channels: int) -> int:
        return 1 + latent_channels

    def condition(self, images, latent_size, autoencoder=None, masks=None, generators=None,
                  noise_level=None):
        if autoencoder is None or masks is None:
            raise ValueError("an inpainting condition needs the autoencoder and a mask")
        return inpaint_condition(autoencoder, images, masks, generators)

    def training_masks(self, batch_size, height, width, generator=None):
        return random_masks(batch_size, height, width, generator)

    def sample_inputs(self, images):
        h, w = images.shape[-2:]
        mask = torch.zeros(images.shape[0], 1, h, w)
        mask[:, :, h // 4:h - h // 4, w // 4:w - w // 4] = 1.0  # the centre
        return {"image": images, "mask": mask}

    def shown(self, inputs, latent_size):
        return inputs["image"] * (1 - inputs["mask"])


SPATIAL_CONDITIONS: dict[str, SpatialCondition] = {"low_res": LowResolution(), "inpaint": Inpainting()}
SPATIAL_KINDS: tuple[str, ...] = ("none", *SPATIAL_CONDITIONS)


def spatial_kind(kind: SpatialKind) -> SpatialCondition | None:
    """The spatial condition `conditioning.spatial` names, None for "none"."""
    if kind == "none":
        return None
    if kind not in SPATIAL_CONDITIONS:
        raise ValueError(f"unknown spatial condition {kind!r}; expected one of {', '.join(SPATIAL_CONDITIONS)}")
    return SPATIAL_CONDITIONS[kind]


def spatial_channels(kind: SpatialKind, image_channels: int, latent_channels: int) -> int:
    """Channels a spatial condition adds to the UNet's input."""
    spatial = spatial_kind(kind)
    return 0 if spatial is None else spatial.channels(image_channels, latent_channels)


def check_spatial(kind: SpatialKind, concat_channels: int, image_channels: int, latent_channels: int) -> None:
    """The UNet's concat_channels must be what the spatial condition provides."""
    expected = spatial_channels(kind, image_channels, latent_channels)
    if concat_channels != expected:
        raise ConfigError(f"unet.concat_channels = {concat_channels}: conditioning.spatial = '{kind}' provides "
                          f"{expected} channels (image channels {image_channels}, latent channels {latent_channels})")


def infer_spatial(concat_channels: int, image_channels: int, latent_channels: int) -> SpatialKind:
    """The spatial condition a UNet with `concat_channels` extra input channels was trained with."""
    for kind in SPATIAL_KINDS:
        if spatial_channels(kind, image_channels, latent_channels) == concat_channels:
            return kind
    raise ConfigError(f"a UNet with {concat_channels} concatenated input channels: no known spatial condition "
                      f"(inpaint: {1 + latent_channels}, low_res: {image_channels})")


def with_spatial(network, spatial: torch.Tensor | None, class_labels: torch.Tensor | None = None):
    """`network(x, t, **kw)` with `spatial` concatenated to x (and `class_labels` given, a noise-augmented
    condition's level); repeated when guidance doubles the batch."""
    if spatial is None:
        return network

    def concatenated(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        repeats = x.shape[0] // spatial.shape[0]
        if class_labels is not None:
            kwargs["class_labels"] = class_labels.repeat(repeats)
        return network(torch.cat([x, spatial.to(x.dtype).repeat(repeats, 1, 1, 1)], dim=1), t, **kwargs)
    return concatenated
