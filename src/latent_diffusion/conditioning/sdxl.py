"""SDXL's condition encoder (Podell et al. 2023, §2.1–2.2): two frozen CLIP text encoders and micro-conditioning.

- tokens: the penultimate states, without the final LayerNorm, of CLIP ViT-L (768 wide) and OpenCLIP ViT-bigG
  (1280), concatenated along the width: (B, 77, 2048). The refiner has bigG's alone (1280).
- vector (`Conditioning.vector`, the UNet's `adm_in_channels`): bigG's projected pooled output (1280), then 256
  Fourier features (`timestep_embedding`) for each number of the micro-conditioning: original size (h, w), crop
  top-left (top, left) and target size (h, w) for the base (2816); original size, crop and aesthetic score for
  the refiner (2560).
- ∅ is zero tokens and a zero pooled output (sgm's `force_uc_zero_embeddings`, diffusers'
  `force_zeros_for_empty_prompt`), with the request's size features; the refiner's ∅ and negative prompts get
  the negative aesthetic score. Training drops captions to this same ∅.

Weights: `SDXLTextEncoder`'s state dict holds the first encoder under `clip.` and the second under `clip_2.`, each
in `ClipTextTransformer`'s names (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` layout).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder, check_prompts
from latent_diffusion.conditioning.clip import ClipTextTransformer, clip_text_transformer
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.dropout import drop_condition
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ClipTextConfig, ConditioningConfig, ConfigError
from latent_diffusion.files.weights import CheckpointError, read_weights
from latent_diffusion.nn.embeddings import timestep_embedding

FOURIER_DIM = 256  # features per micro-conditioning number (diffusers' `addition_time_embed_dim`)
MICRO_NUMBERS = {"size": 6, "aesthetic": 5}  # numbers after the pooled text: sizes + crop (+ target or score)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults
ENCODER_NAMES = ("clip", "clip_2")  # the two encoders' prefixes in the weights, as their config fields


@dataclass(frozen=True)
class MicroConditions:
    """What an SDXL request says about its image besides the prompt (sizes (height, width) in pixels).

    :param original_size: the size the training image had before resizing (default: the target size).
    :param crop: the top-left corner of the crop taken from it (default (0, 0): uncropped).
    :param target_size: the size of the image drawn (default: the output's).
    :param aesthetic_score: the refiner's score for the prompts, `negative_aesthetic_score` for ∅ and negative
        prompts.
    :param negative_original_size, negative_crop, negative_target_size: what ∅ and negative prompts are told
        instead (default: the same as the prompts, as sgm and diffusers' base pipeline do; diffusers' img2img and
        refiner pipelines default negative_crop to (0, 0)).
    """

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    negative_original_size: tuple[int, int] | None = None
    negative_crop: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None

    def numbers(self, kind: str, negative: bool) -> list[float]:
        """The numbers the vector embeds, in sgm's and diffusers' order."""
        original, crop, target = self.original_size, self.crop, self.target_size
        if negative:
            original = self.negative_original_size or original
            crop = self.negative_crop or crop
            target = self.negative_target_size or target
        if kind == "size":
            return [*original, *crop, *target]
        return [*original, *crop, self.negative_aesthetic_score if negative else self.aesthetic_score]


def micro_conditions(size: tuple[int, int], options: Mapping[str, Any] | None) -> MicroConditions:
    """A request's `MicroConditions` for an output of `size` (h, w), from its options (`MicroConditions`' fields;
    None: the defaults); a clear error for others."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(MicroConditions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an SDXL micro-conditioning option "
                         f"({', '.join(MicroConditions.__dataclass_fields__)})")
    for name in ("original_size", "crop", "target_size", "negative_original_size", "negative_crop",
                 "negative_target_size"):
        value = options.get(name)
        if value is not None and (len(value) != 2 or not all(isinstance(v, int) and v >= 0 for v in value)):
            raise ValueError(f"{name} = {value!r}: expected two integers >= 0, "
                             + ("(top, left)" if name.endswith("crop") else "(height, width)"))
        if value is not None:
            options[name] = tuple(value)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if name in options and not isinstance(options[name], (int, float)):
            raise ValueError(f"{name} = {options[name]!r}: expected a number (LAION aesthetic scores run 1–10)")
    target = tuple(options.pop("target_size", size))
    original = tuple(options.pop("original_size", target))
    return MicroConditions(original_size=original, target_size=target, **options)


def fourier_features(numbers: torch.Tensor) -> torch.Tensor:
    """(B, K) numbers → (B, K·256) sinusoidal features, each number embedded alone (sgm's
    `ConcatTimestepEmbedderND`, diffusers' `add_time_proj`: cos first, no frequency shift)."""
    b, k = numbers.shape
    return timestep_embedding(numbers.reshape(-1), FOURIER_DIM).reshape(b, k * FOURIER_DIM)


def _weights_of(weights: Mapping[str, torch.Tensor] | None, name: str) -> dict[str, torch.Tensor] | None:
    if weights is None:
        return None
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


class SDXLTextEncoder(FrozenEncoder):
    """Frozen SDXL text encoders: prompts → Conditioning(tokens (B, 77, Σ widths), mask all True, vector = the
    second encoder's projected pooled output (B, projection_dim)).

    :param cfg: the model's conditioning (its `clip` and `clip_2`).
    :param weights: our-named weights (`clip.*`, `clip_2.*`), or a .safetensors file of them (a model folder's
        text_encoder.safetensors); None leaves them random (tests only).
    :param tokenizer: the vocabulary (default: the bundled CLIP one); each encoder pads with its own pad id.
    """

    def __init__(self, cfg: ConditioningConfig, weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
                 tokenizer: ClipTokenizer | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if weights is not None and not isinstance(weights, Mapping):
            weights = read_weights(weights, dtype)
        self.configs: dict[str, ClipTextConfig] = {name: getattr(cfg, name) for name in ENCODER_NAMES
                                                   if getattr(cfg, name) is not None}
        if weights is not None:
            unknown = sorted({k.split(".")[0] for k in weights} - set(self.configs))
            if unknown:
                raise CheckpointError(f"SDXL text encoder weights: unexpected parts {unknown} (expected "
                                      f"{', '.join(self.configs)})")
        base = tokenizer or ClipTokenizer.from_bpe_file()
        self.tokenizers: dict[str, ClipTokenizer] = {}
        for name, config in self.configs.items():
            setattr(self, name, clip_text_transformer(config, _weights_of(weights, name), dtype))
            if base.context_length > config.max_positions:
                raise ConfigError(f"tokenizer context_length {base.context_length} exceeds {name}.max_positions "
                                  f"{config.max_positions}")
            self.tokenizers[name] = ClipTokenizer(base.vocab, base.merges, config.max_positions, config.pad_token_id)
        self.dim = sum(config.width for config in self.configs.values())
        self.pooled_dim = cfg.clip_2.projection_dim
        self.freeze()

    def transformers(self) -> dict[str, ClipTextTransformer]:
        return {name: getattr(self, name) for name in self.configs}

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        return self.encode(prompts)

    def encode(self, prompts: list[str]) -> Conditioning:
        """`forward` with autograd on (the weights stay frozen)."""
        prompts = check_prompts(prompts)
        states, pooled = [], None
        for name, transformer in self.transformers().items():
            input_ids = self.tokenizers[name](prompts).to(self.device)  # (B, 77)
            if name == "clip_2":
                hidden, pooled = transformer(input_ids, return_pooled=True)  # (B, 77, D2), (B, P)
            else:
                hidden = transformer(input_ids)  # (B, 77, D1)
            states.append(hidden)
        tokens = torch.cat(states, dim=-1)  # (B, 77, ΣD)
        return Conditioning(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                            vector=pooled)

    def settings(self) -> dict[str, Any]:
        return {"configs": self.configs, "vocab": len(self.tokenizers["clip_2"].vocab)}


class SDXLConditioner(Conditioner):
    """SDXL's two text encoders and micro-conditioning (module docstring): config name "sdxl". Nothing is trained
    with the UNet; its weights come with a checkpoint or from `conditioning.path`."""

    network = SDXLTextEncoder
    takes_text_weights = True
    stores_in_dtype = True

    def __init__(self, cfg: ConditioningConfig, encoder: SDXLTextEncoder, micro: MicroConditions | None = None):
        self.cfg, self.encoder, self.micro = cfg, encoder, micro
        self.dim = encoder.dim

    @classmethod
    def build(cls, cfg: ConditioningConfig, device: torch.device, context_dim: int | None = None,
              text_weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
              tokenizer: ClipTokenizer | None = None) -> SDXLConditioner:
        if cfg.adapter_layers:
            raise ConfigError("conditioning.adapter_layers: an 'sdxl' model has no text adapter")
        encoder = SDXLTextEncoder(cfg, cfg.path if text_weights is None else text_weights, tokenizer, dtype)
        return cls(cfg, encoder.to(device))

    @classmethod
    def check_trainable(cls, cfg: ConditioningConfig) -> None:
        if cfg.path is None:
            raise ConfigError("conditioning.encoder = 'sdxl' with no conditioning.path: the text encoders would have "
                              "random weights. Set conditioning.path to an SDXL model folder's "
                              "text_encoder.safetensors (`ldm convert` writes one from an SDXL checkpoint)")

    @property
    def vector_dim(self) -> int:
        """The width of the vector condition: the pooled text, then 256 features per micro-conditioning number."""
        return self.encoder.pooled_dim + FOURIER_DIM * MICRO_NUMBERS[self.cfg.micro_conditioning]

    @property
    def trainable(self) -> nn.Module | None:
        return None

    def with_trainable(self, module: nn.Module) -> SDXLConditioner:
        raise ValueError("an 'sdxl' model trains nothing besides the UNet")

    def at(self, micro: MicroConditions) -> SDXLConditioner:
        """The same encoder for requests with these micro-conditions."""
        changed = copy.copy(self)
        changed.micro = micro
        return changed

    def _with_vector(self, cond: Conditioning, micro: Sequence[MicroConditions], negative: bool) -> Conditioning:
        numbers = torch.tensor([m.numbers(self.cfg.micro_conditioning, negative) for m in micro],
                               device=cond.tokens.device)
        features = fourier_features(numbers).to(cond.vector.dtype)
        return Conditioning(cond.tokens, cond.mask, cond.extra, torch.cat([cond.vector, features], dim=-1))

    def _micro(self, n: int) -> list[MicroConditions]:
        if self.micro is None:
            raise ValueError("an SDXL model's conditions need the image's size: use encode_request(prompts, ..., "
                             "size=(height, width)), or at(MicroConditions(...))")
        return [self.micro] * n

    def _null(self, n: int) -> Conditioning:
        """∅ before its size features: zero tokens and a zero pooled output."""
        dtype = next(self.encoder.parameters()).dtype
        tokens = torch.zeros(n, self.encoder.tokenizers["clip_2"].context_length, self.dim, dtype=dtype,
                             device=self.encoder.device)
        return Conditioning(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                            vector=torch.zeros(n, self.encoder.pooled_dim, dtype=dtype, device=tokens.device))

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return self._with_vector(self.encoder(list(prompts)), self._micro(len(prompts)), negative=False)

    def unconditional(self, batch_size: int) -> Conditioning:
        return self._with_vector(self._null(batch_size), self._micro(batch_size), negative=True)

    def encode_request(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
                       size: tuple[int, int], micro: Mapping[str, Any] | None = None
                       ) -> tuple[Conditioning, Conditioning]:
        conditioner = self.at(micro_conditions(size, micro))
        cond = conditioner.encode_prompts(prompts)
        if negative_prompts is None:
            return cond, conditioner.unconditional(len(prompts))
        negative = self.encoder(list(negative_prompts))
        return cond, conditioner._with_vector(negative, conditioner._micro(len(negative_prompts)), negative=True)

    def encode_items(self, items: Sequence[dict]) -> Conditioning:
        return self._with_vector(self.encoder([item["caption"] for item in items]), _item_micro(items), False)

    def training_inputs(self, items: Sequence[dict], drop: torch.Tensor) -> Conditioning:
        """The captions' conditions, ∅ (zero text, the item's own size features) where `drop` is True."""
        micro = _item_micro(items)
        cond = self._with_vector(self.encoder([item["caption"] for item in items]), micro, negative=False)
        return drop_condition(cond, self._with_vector(self._null(len(items)), micro, negative=True), drop)

    def label_prompt(self, label: int, caption: str) -> str:
        return caption


def _item_micro(items: Sequence[dict]) -> list[MicroConditions]:
    """Each training item's micro-conditions: its `original_size`, `crop` and `size` (the training crop's)."""
    if any(item.get("size") is None for item in items):
        raise ValueError("SDXL training items need each image's size, original size and crop (the latent cache "
                         "records them: delete a cache written by an older version to encode it again)")
    return [MicroConditions(original_size=tuple(item["original_size"]), target_size=tuple(item["size"]),
                            crop=tuple(item["crop"])) for item in items]
