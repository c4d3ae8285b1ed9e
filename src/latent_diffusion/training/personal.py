"""What an adapter run trains, each attached to the frozen model from outside: LoRA adapters (`nn.lora`), a new
word's token vectors (`conditioning.embeddings`), and a ControlNet (`controlnet.py`) whose residuals the UNet adds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder
from latent_diffusion.conditioning.clip import ClipAttention, ClipMLP, ClipTextEncoder
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.control_images import control_type
from latent_diffusion.conditioning.embeddings import A1111_INIT_TEXT, add_embedding
from latent_diffusion.config import ConfigError
from latent_diffusion.controlnet import ControlNet
from latent_diffusion.formats.controlnet import save_controlnet
from latent_diffusion.formats.embeddings import DIFFUSERS_FILES, write_embedding
from latent_diffusion.formats.lora import write_lora
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.nn.attention import SpatialTransformer
from latent_diffusion.nn.lora import LoRA
from latent_diffusion.training.adapter_config import (AdapterRunConfig, ControlNetSettings, EmbeddingSettings,
                                                     LoRASettings)
from latent_diffusion.unet import Downsample, ResBlock, Upsample, UNetModel

LORA_FILES = {"kohya": "lora.safetensors", "peft": "pytorch_lora_weights.safetensors"}
CONTROLNET_FILE = "controlnet.safetensors"


class Adapter(Protocol):
    """What a personalisation run trains.

    `module` holds every trained parameter (checkpointed, averaged by EMA); `trains_text` says whether the
    condition must be computed through the text encoder with gradients (`encode`); `reads_controls` whether each
    training image comes with a control map (`unet_kwargs` gets them)."""

    module: nn.Module
    trains_text: bool
    reads_controls: bool

    def unet_kwargs(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                    controls: torch.Tensor | None) -> dict:
        """What the adapter passes to the frozen UNet's forward besides the condition (a ControlNet's residuals)."""

    def encode(self, conditioner: Conditioner, captions: list[str]) -> Conditioning:
        """The frozen text encoder's tokens of `captions`, with gradients reaching the adapter."""

    def check_captions(self, captions: Sequence[str]) -> None:
        """Refuse training data that cannot teach the adapter (e.g. no caption holds the new word)."""

    def write(self, out: Path, step: int) -> list[Path]:
        """Write the adapter file(s) people share into run folder `out`; returns them."""


def unet_lora_layers(unet: UNetModel, conv: bool = False) -> list[str]:
    """The UNet layers kohya's LoRA adapts (sd-scripts networks/lora.py, `UNET_TARGET_REPLACE_MODULE`): every
    Linear and 1×1 convolution inside the transformer blocks (attention, feed-forward, proj_in/out); with `conv`
    (LoCon, `UNET_TARGET_REPLACE_MODULE_CONV2D_3X3`), also the 3×3 convolutions of the residual blocks and
    resamplers."""
    names = []
    for parent, module in unet.named_modules():
        if isinstance(module, SpatialTransformer):
            names += [f"{parent}.{name}" for name, layer in module.named_modules()
                      if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))]
        elif conv and isinstance(module, ResBlock | Downsample | Upsample):
            names += [f"{parent}.{name}" for name, layer in module.named_modules()
                      if isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3)]
    return names


def text_lora_layers(transformer: nn.Module) -> list[str]:
    """The CLIP text encoder layers kohya's LoRA adapts (`TEXT_ENCODER_TARGET_REPLACE_MODULE`: CLIPAttention,
    CLIPMLP): q, k, v, out projections and the MLP's fc1, fc2."""
    return [f"{parent}.{name}" for parent, module in transformer.named_modules()
            if isinstance(module, ClipAttention | ClipMLP)
            for name, layer in module.named_children() if isinstance(layer, nn.Linear)]


class _ReachesFromOutside:
    """Adapters that act through hooks or token vectors: nothing passed to the UNet, no control maps read."""

    reads_controls = False

    def unet_kwargs(self, x, t, cond, controls) -> dict:
        return {}


class LoRAAdapter(_ReachesFromOutside):
    """LoRA on the UNet's transformer layers (and optionally its 3×3 convolutions and CLIP's layers)."""

    def __init__(self, settings: LoRASettings, unet: UNetModel, conditioner: Conditioner, parts: ModelParts):
        self.settings, self.parts = settings, parts
        loras = {"unet": LoRA(unet, unet_lora_layers(unet, settings.conv), settings.rank, settings.alpha)}
        if settings.text_encoder:
            encoder = getattr(conditioner, "encoder", None)
            if not isinstance(encoder, ClipTextEncoder):
                raise ConfigError(f"--text-encoder: this model's condition encoder is "
                                  f"{parts.conditioning.encoder!r}; LoRA on the text encoder is for CLIP models")
            loras["text_encoder"] = LoRA(encoder.transformer, text_lora_layers(encoder.transformer),
                                         settings.rank, settings.alpha)
        self.module = nn.ModuleDict(loras)
        self.trains_text = settings.text_encoder

    def encode(self, conditioner: Conditioner, captions: list[str]) -> Conditioning:
        return conditioner.encoder.encode(captions)

    def check_captions(self, captions: Sequence[str]) -> None:
        pass

    def write(self, out: Path, step: int) -> list[Path]:
        layers = {f"{part}.{name}": adapter for part, lora in self.module.items()
                  for name, adapter in lora.by_layer().items()}
        path = out / LORA_FILES[self.settings.format]
        write_lora(path, layers, self.parts.unet_config, fmt=self.settings.format,
                   metadata={"ss_network_dim": str(self.settings.rank), "ss_steps": str(step)})
        return [path]


class _Vectors(nn.Module):
    """The trained token vectors as a module (for the optimiser, the checkpoint and EMA)."""

    def __init__(self, vectors: nn.Parameter):
        super().__init__()
        self.vectors = vectors


class EmbeddingAdapter(_ReachesFromOutside):
    """A new trigger word's N token vectors (textual inversion), the text encoder and UNet frozen."""

    trains_text = True

    def __init__(self, settings: EmbeddingSettings, conditioner: Conditioner, parts: ModelParts):
        encoder = getattr(conditioner, "encoder", None)
        if not isinstance(encoder, FrozenEncoder):
            raise ConfigError(f"--model: a {parts.conditioning.encoder!r}-conditioned model has no text encoder to "
                              "learn a word for")
        if not settings.token.strip():
            raise ConfigError("--token: give the trigger word to learn, e.g. --token '<my-thing>'")
        if settings.vectors < 1:
            raise ConfigError(f"--vectors {settings.vectors}: expected at least 1")
        self.settings = settings
        vectors = add_embedding(encoder, settings.token, num_vectors=settings.vectors,
                                init_word=settings.init_word or A1111_INIT_TEXT, trainable=True)
        self.module = _Vectors(vectors)

    def encode(self, conditioner: Conditioner, captions: list[str]) -> Conditioning:
        return conditioner.encoder.encode(captions)

    def check_captions(self, captions: Sequence[str]) -> None:
        token = self.settings.token
        if not any(token.lower() in caption.lower() for caption in captions):  # triggers match in any case
            raise ValueError(f"--token {token!r}: none of the {len(captions)} training captions contains it, so "
                             f"nothing would teach its vectors; write it into the captions (e.g. 'a photo of "
                             f"{token}')")

    def write(self, out: Path, step: int) -> list[Path]:
        vectors = self.module.vectors.detach()
        return [write_embedding(self.settings.file, self.settings.token, vectors, "a1111", step),
                write_embedding(out / DIFFUSERS_FILES[0], self.settings.token, vectors, "diffusers")]


class ControlNetAdapter:
    """A ControlNet beside the frozen UNet, its encoder copied from the UNet's and its zero convolutions at zero,
    trained on the data's control maps."""

    trains_text, reads_controls = False, True

    def __init__(self, settings: ControlNetSettings, unet: UNetModel, parts: ModelParts):
        control_type(settings.control_type)  # a clear error for an unknown kind
        self.settings = settings
        self.module = ControlNet.from_unet(unet, parts.autoencoder_config.downsample_factor)

    def unet_kwargs(self, x, t, cond, controls) -> dict:
        return {"residuals": self.module(x, t, controls.to(x.dtype), context=cond.tokens, context_mask=cond.mask)}

    def encode(self, conditioner: Conditioner, captions: list[str]) -> Conditioning:
        raise NotImplementedError("a ControlNet trains no part of the text encoder")

    def check_captions(self, captions: Sequence[str]) -> None:
        pass

    def write(self, out: Path, step: int) -> list[Path]:
        files = [out / CONTROLNET_FILE]
        save_controlnet(self.module, files[0], "original")
        if self.settings.format == "diffusers":
            files.append(out / "controlnet")
            save_controlnet(self.module, files[1], "diffusers")
        return files


def make_adapter(cfg: AdapterRunConfig, unet: UNetModel, conditioner: Conditioner, parts: ModelParts) -> Adapter:
    """The adapter `cfg.kind` asks for, attached to the model."""
    if cfg.kind == "lora":
        return LoRAAdapter(cfg.lora, unet, conditioner, parts)
    if cfg.kind == "controlnet":
        return ControlNetAdapter(cfg.controlnet, unet, parts)
    return EmbeddingAdapter(cfg.embedding, conditioner, parts)
