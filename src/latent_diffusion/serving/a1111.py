"""AUTOMATIC1111's HTTP API (`modules/api/models.py`, `api.py`): its request fields, mapped onto a `Pipeline` call,
and its response shape (`images` as base64 PNGs with their parameters, `info` a JSON string).

Fields are A1111's names. Those left out take the loaded model's defaults (size, steps, sampler, guidance:
A1111's own are SD 1.5's 512², 50 steps); `info` says which. Fields this project does not implement are
refused with a 422 naming them when they ask for something (`hr` upscaling, face restoration, subseeds, scripts),
and reported in `info` as ignored when they do not change the image (saving, sending, styles)."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, UnidentifiedImageError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from latent_diffusion.generation.request import MAX_BATCH, MAX_GUIDANCE, MAX_NUM_IMAGES, MAX_SEED
from latent_diffusion.images import image_parameters
from latent_diffusion.pipeline.infotext import format_infotext, parse_infotext
from latent_diffusion.samplers import sampler_label
from latent_diffusion.serving.common import MAX_API_SIDE, base64_bytes, decode_base64_image, pipeline_kwargs

# Fields that change the image when set; the value each must keep here
UNSUPPORTED = {"enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0.0,
               "script_name": None, "refiner_checkpoint": None, "alwayson_scripts": {}, "hr_scale": 2.0,
               "seed_resize_from_h": -1, "seed_resize_from_w": -1, "resize_mode": 0, "inpainting_fill": 1,
               "inpaint_full_res": False, "image_cfg_scale": None, "include_init_images": False}


class Txt2ImgRequest(BaseModel):
    """`POST /sdapi/v1/txt2img`."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=1000)
    cfg_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    sampler_name: str | None = None
    scheduler: str | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_NUM_IMAGES)
    width: int | None = Field(None, ge=8, le=MAX_API_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_API_SIDE)
    eta: float | None = Field(None, ge=0, le=1)
    denoising_strength: float | None = Field(None, ge=0, le=1)
    override_settings: dict[str, Any] = Field(default_factory=dict)  # sd_model_checkpoint: this request's model

    @field_validator("sampler_name")
    @classmethod
    def _known_sampler(cls, name: str | None) -> str | None:
        from latent_diffusion.samplers import resolve_sampler

        if name is not None:
            resolve_sampler(name)
        return name


class Img2ImgRequest(Txt2ImgRequest):
    """`POST /sdapi/v1/img2img`: `init_images` (one base64 image) and optionally `mask`."""

    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: str | None = None
    denoising_strength: float = Field(0.75, gt=0, le=1)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


def refused(request: Txt2ImgRequest) -> list[str]:
    """The fields set to something this server does not do (a 422 names them)."""
    extra = request.model_extra or {}
    return [name for name, default in UNSUPPORTED.items() if name in extra and extra[name] not in (default, None)
            and not (isinstance(default, dict) and not extra[name])]


def ignored(request: Txt2ImgRequest) -> list[str]:
    """The fields accepted without effect (reported in `info`)."""
    extra = request.model_extra or {}
    overridden = [f"override_settings.{key}" for key in request.override_settings if key != "sd_model_checkpoint"]
    return sorted([name for name in extra if name not in UNSUPPORTED] + overridden)


def generation_kwargs(pipe, request: Txt2ImgRequest, seed: int) -> dict[str, Any]:
    """The `Pipeline.generate_tensors` keywords of a request (one batch), the model's defaults filled in."""
    image = mask = strength = None
    if isinstance(request, Img2ImgRequest):
        image = decode_base64_image(request.init_images[0], "init_images[0]")
        strength = request.denoising_strength
        if request.mask is not None:
            mask = decode_base64_image(request.mask, "mask").convert("L")
            mask = mask.point(lambda v: 255 - v) if request.inpainting_mask_invert else mask
    return pipeline_kwargs(pipe, FIELD_NAMES, prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                           steps=request.steps, guidance=request.cfg_scale, sampler=request.sampler_name,
                           eta=request.eta, karras=True if (request.scheduler or "").lower() == "karras" else None,
                           seed=seed, num_images=request.batch_size, height=request.height, width=request.width,
                           image=image, mask=mask, strength=strength)


# How errors name `Pipeline` keywords: by the request fields A1111 clients send
FIELD_NAMES = {"steps": "steps", "guidance_scale": "cfg_scale", "sampler": "sampler_name", "eta": "eta",
               "karras": "scheduler", "seed": "seed", "num_images": "batch_size", "height": "height",
               "width": "width", "image": "init_images", "mask": "mask", "strength": "denoising_strength"}


def infotext(kwargs: dict[str, Any], seed: int, model: str) -> str:
    """A1111's parameters text of one image."""
    return format_infotext(kwargs["prompt"], kwargs["negative_prompt"], kwargs["steps"],
                           sampler_label(kwargs["sampler"], bool(kwargs["karras"])), kwargs["guidance_scale"], seed,
                           kwargs["width"], kwargs["height"], model=model, eta=kwargs["eta"],
                           strength=kwargs.get("strength"))


def response(images: list[str], request: Txt2ImgRequest, kwargs: dict[str, Any], seeds: list[int],
             texts: list[str]) -> dict[str, Any]:
    """A1111's response: images, the request's parameters, `info` as a JSON string."""
    info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": seeds[0],
            "all_seeds": seeds, "all_prompts": [request.prompt] * len(seeds), "width": kwargs["width"],
            "height": kwargs["height"], "sampler_name": sampler_label(kwargs["sampler"], bool(kwargs["karras"])),
            "steps": kwargs["steps"], "cfg_scale": kwargs["guidance_scale"], "batch_size": request.batch_size,
            "infotexts": texts, "ignored_fields": ignored(request),
            "model_defaults": [name for name in ("steps", "cfg_scale", "sampler_name", "width", "height")
                               if getattr(request, name) is None]}
    parameters = request.model_dump(exclude={"init_images", "mask"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


class PngInfoRequest(BaseModel):
    """`POST /sdapi/v1/png-info`."""

    image: str


def png_info(request: PngInfoRequest) -> dict[str, Any]:
    """A1111's answer: the image's parameters text (`info`, "" when none), its other text chunks (`items`), and
    the settings read from the text (`parameters`, by this project's keyword names)."""
    try:
        with Image.open(io.BytesIO(base64_bytes(request.image, "image"))) as image:
            text = image_parameters(image)
            items = {key: value for key, value in image.info.items() if isinstance(value, str) and key != "parameters"}
    except (UnidentifiedImageError, OSError):
        raise ValueError("image: not an image file") from None
    return {"info": text or "", "items": items, "parameters": parse_infotext(text) if text else {}}
