"""The server's own JSON API (`/api/v1/...`), this project's names for this project's options: what the web page
speaks. A request names its model and LoRAs among those the server offers; an image and mask (base64) make it
img2img or inpainting; `task_id`, chosen by the client, is how it asks for the job's progress and preview while it
waits for the answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from latent_diffusion.generation.request import MAX_BATCH, MAX_GUIDANCE, MAX_SEED
from latent_diffusion.serving.common import MAX_API_SIDE, decode_base64_image, pipeline_kwargs

MAX_PROMPT = 10_000  # characters


class LoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a LoRA the server offers (GET /api/v1/models)")
    weight: float = Field(1.0, ge=-10, le=10)


class GenerateRequest(BaseModel):
    """`POST /api/v1/generate`. Left out: the model's defaults (size, steps, sampler, guidance); seed: random."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT)
    model: str | None = Field(None, description="a model the server offers (default: its current one)")
    loras: list[LoRARequest] = Field(default_factory=list, max_length=8)
    sampler: str | None = Field(None, description="our name or A1111's (GET /api/v1/models lists them)")
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    karras: bool | None = None
    eta: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image k gets seed + k; default random")
    num_images: int = Field(1, ge=1, le=MAX_BATCH)
    width: int | None = Field(None, ge=8, le=MAX_API_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_API_SIDE)
    image: str | None = Field(None, description="base64 image to start from (img2img)")
    mask: str | None = Field(None, description="base64 mask, white = draw anew (inpainting; needs image)")
    strength: float | None = Field(None, gt=0, le=1, description="share of the steps run from the image")
    task_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                description="the client's name for this job (GET /api/v1/progress?task_id=...)")


class GeneratedImage(BaseModel):
    png: str = Field(description="base64 PNG with its generation parameters in the `parameters` text chunk")
    seed: int
    parameters: str


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    model: str
    sampler: str
    steps: int
    guidance: float
    width: int
    height: int


class ProgressResponse(BaseModel):
    state: str = Field(description="queued, running, or unknown (finished, or never submitted)")
    queue_position: int = 0
    step: int = 0
    steps: int = 0
    fraction: float = 0.0
    eta: float = 0.0
    preview: str | None = Field(None, description="base64 PNG: a cheap decode of the latest step's prediction")


class ModelsResponse(BaseModel):
    models: list[str]
    current: str
    loaded: str | None
    loras: list[str]
    samplers: list[str]


def generation_kwargs(pipe, request: GenerateRequest, seed: int) -> dict[str, Any]:
    """The `Pipeline.generate_tensors` keywords of a request, the model's defaults filled in."""
    image = None if request.image is None else decode_base64_image(request.image, "image")
    mask = None if request.mask is None else decode_base64_image(request.mask, "mask").convert("L")
    return pipeline_kwargs(pipe, FIELD_NAMES, prompt=request.prompt, negative_prompt=request.negative_prompt,
                           steps=request.steps, guidance=request.guidance, sampler=request.sampler, eta=request.eta,
                           karras=request.karras, seed=seed, num_images=request.num_images, height=request.height,
                           width=request.width, image=image, mask=mask, strength=request.strength)


# How errors name `Pipeline` keywords: by this API's fields
FIELD_NAMES = {"guidance_scale": "guidance", "image": "image", "mask": "mask"}
