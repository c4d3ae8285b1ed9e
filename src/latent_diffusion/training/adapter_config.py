"""What `ldm train-lora`, `ldm train-embedding` and `ldm train-controlnet` train, as the `adapter.yaml` of their run
folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latent_diffusion.config import TrainConfig

ADAPTER_CONFIG_FILE = "adapter.yaml"


@dataclass(frozen=True)
class LoRASettings:
    """Low-rank adapters on the base model's layers (`nn.lora`).

    :param rank: r, the width of each adapter.
    :param alpha: the adapters' output is scaled by alpha / rank (kohya's `network_alpha`); None: alpha = rank.
    :param conv: also adapt the 3×3 convolutions of the UNet's residual blocks and resamplers (LoCon), besides
        every linear and 1×1 layer of its transformer blocks.
    :param text_encoder: also adapt the CLIP text encoder's attention and MLP layers (CLIP models only).
    :param format: the file written: "kohya" (`lora_unet_…`, what AUTOMATIC1111 and ComfyUI read) or "peft"
        (diffusers' `unet.….lora_A.weight`, what `load_lora_weights` reads).
    """

    rank: int = 8
    alpha: float | None = None
    conv: bool = False
    text_encoder: bool = False
    format: Literal["kohya", "peft"] = "kohya"


@dataclass(frozen=True)
class EmbeddingSettings:
    """A new word for the text encoder (textual inversion, Gal et al. 2022): `vectors` token vectors learnt with
    the whole model frozen.

    :param token: the trigger word, e.g. "<my-thing>"; the training captions must contain it.
    :param init_word: the vectors start from this word's token embeddings (None: AUTOMATIC1111's default, "*").
    :param file: the embedding file written, in AUTOMATIC1111's layout (`.safetensors`: `emb_params`; `.pt`);
        diffusers' `learned_embeds.safetensors` is written in the run folder.
    """

    token: str = ""
    vectors: int = 1
    init_word: str | None = None
    file: str = ""


@dataclass(frozen=True)
class ControlNetSettings:
    """A ControlNet (Zhang et al. 2023) trained on the data's control maps (metadata.jsonl's `conditioning_image`),
    its encoder starting as a copy of the model's.

    :param control_type: what the maps are ("mask", "canny", "seg", ...: `conditioning.control_images`), recorded
        for the user; the maps are read as given.
    :param format: the file written: "original" (`controlnet.safetensors`, `control_model.*`: what AUTOMATIC1111's
        extension and ComfyUI load), or "diffusers" (a `controlnet/` ControlNetModel folder as well).
    """

    control_type: str = "none"
    format: Literal["original", "diffusers"] = "original"


def _adapter_training() -> TrainConfig:
    return TrainConfig(batch_size=4, learning_rate=1e-4, adam_betas=(0.9, 0.999), max_steps=500, log_every=25,
                       image_every=100, checkpoint_every=100, weight_decay=0.0)


@dataclass(frozen=True)
class AdapterRunConfig:
    """One run of `ldm train-lora` / `ldm train-embedding` / `ldm train-controlnet`.

    :param model: the base model (any format `load_model` reads), frozen.
    :param resolution: the training image size; None: the model's.
    :param p_uncond: the share of captions dropped for classifier-free guidance; None: the model's own.
    :param prompts: sample-grid prompts; empty: the first captions of the data.
    :param sample_steps: sampling steps of the grids (the model's sampler and guidance); 0: no grids.
    """

    model: str
    kind: Literal["lora", "embedding", "controlnet"]
    lora: LoRASettings = field(default_factory=LoRASettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    controlnet: ControlNetSettings = field(default_factory=ControlNetSettings)
    resolution: int | None = None
    p_uncond: float | None = None
    prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    training: TrainConfig = field(default_factory=_adapter_training)
