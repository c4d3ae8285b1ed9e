"""A whole text-to-image model in memory (`ModelParts`), and the three on-disk formats it moves between.

Every reader returns `ModelParts` with tensors in our (CompVis-layout) naming, every writer takes one:

- **native**: a model folder as `ldm train` writes it (`config.yaml`, `unet.safetensors`, `autoencoder/`,
  `text_encoder.safetensors` for CLIP models, `conditioner.safetensors` for class-conditional ones and text adapters);
- **original**: one Stable Diffusion checkpoint file (`.safetensors` or `.ckpt`; CompVis/Stability key layout);
- **diffusers**: a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

`load_model(path)` tells the formats apart; `save_model(parts, path, fmt)` writes any of them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from latent_diffusion.autoencoder import AutoencoderKL, build_autoencoder
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.registry import build_conditioner, conditioner_type
from latent_diffusion.conditioning.sd3 import SD3Tokenizers
from latent_diffusion.conditioning.spatial import check_spatial
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import (AutoencoderConfig, AutoencoderRunConfig, ConditioningConfig, ConfigError,
                                     DataConfig, DiffusionConfig, DiTConfig, LDMRunConfig, MMDiTConfig, SamplingConfig,
                                     TrainConfig, UNetConfig, load_config, save_config)
from latent_diffusion.files.weights import CheckpointError, load_module_weights, module_from_weights, read_weights, \
    save_weights
from latent_diffusion.backbones import build_backbone
from latent_diffusion.unet import UNetModel

Format = Literal["native", "original", "diffusers"]
FORMATS: tuple[str, ...] = ("native", "original", "diffusers")

CONFIG_FILE = "config.yaml"
UNET_FILE = "unet.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
CONDITIONER_FILE = "conditioner.safetensors"
AUTOENCODER_DIR = "autoencoder"
AE_CONFIG_FILE = "config.yaml"
AE_WEIGHTS_FILE = "autoencoder.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class Recipe:
    """The training sections of a native model: the diffusion run's data and training, the autoencoder's run."""

    data: DataConfig
    training: TrainConfig
    autoencoder: AutoencoderRunConfig


@dataclass
class ModelParts:
    """Configs and weights (our names) of UNet, autoencoder and condition encoder, plus the diffusion settings.

    :param text_encoder: the frozen text encoder's weights for a condition encoder that takes them
        (`Conditioner.takes_text_weights`: CLIP's `ClipTextTransformer`), else None.
    :param conditioner: the weights of the condition encoder's trained part (`Conditioner.trainable`: a
        `ClassEmbedder`, or a `ContextAdapter` with `conditioning.adapter_layers`), else None.
    :param tokenizer: a tokenizer read from the source (a diffusers `tokenizer/` folder; an SD3 model's
        `SD3Tokenizers`, T5's included); None: the bundled one.
    :param resolution: the image size the model was trained at (SD 1.x: 512, SD 2.x v-prediction: 768).
    :param recipe: how the model was trained, when the source says (a native folder's `data` and `training`
        sections, and its autoencoder's run config): kept as read, so that converting keeps a model's recipe.
    """

    unet_config: UNetConfig | DiTConfig | MMDiTConfig  # the denoising network's (a DiT's for `backbone: dit` ...)
    unet: dict[str, torch.Tensor]
    autoencoder_config: AutoencoderConfig
    autoencoder: dict[str, torch.Tensor]
    conditioning: ConditioningConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text_encoder: dict[str, torch.Tensor] | None = None
    conditioner: dict[str, torch.Tensor] | None = None
    tokenizer: ClipTokenizer | SD3Tokenizers | None = None
    resolution: int = 512
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    recipe: Recipe | None = None

    def __post_init__(self) -> None:
        if self.autoencoder_config.latent_scale is None:
            raise CheckpointError("the autoencoder has no latent_scale: run `ldm eval-autoencoder RUN --data HELD_OUT "
                                  "--write-scale` on it first")
        if (conditioner_type(self.conditioning.encoder).takes_text_weights and self.text_encoder is None
                and self.conditioning.path is None):
            raise CheckpointError("a CLIP-conditioned model needs its text encoder weights")

    def run_config(self) -> LDMRunConfig:
        """The `LDMRunConfig` this model would have been trained with (what a native folder's config.yaml holds)."""
        data = self.recipe.data if self.recipe else DataConfig(resolution=self.resolution)
        backbone = {DiTConfig: "dit", MMDiTConfig: "mmdit"}.get(type(self.unet_config))
        network = {"backbone": backbone, backbone: self.unet_config} if backbone else {"unet": self.unet_config}
        return LDMRunConfig(autoencoder=AUTOENCODER_DIR, **network, conditioning=self.conditioning,
                            diffusion=self.diffusion, data=dataclasses.replace(data, resolution=self.resolution),
                            sampling=self.sampling, **({"training": self.recipe.training} if self.recipe else {}))

    def autoencoder_run_config(self) -> AutoencoderRunConfig:
        """The autoencoder's run config (what a native folder's `autoencoder/config.yaml` holds)."""
        if self.recipe is None:
            return AutoencoderRunConfig(model=self.autoencoder_config, data=DataConfig(resolution=self.resolution))
        return dataclasses.replace(self.recipe.autoencoder, model=self.autoencoder_config)

    def networks(self, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> tuple[UNetModel, AutoencoderKL, Conditioner]:
        """The UNet, the autoencoder and the conditioner holding these weights in `dtype` on `device` (tensors
        already there become the modules' weights, not copies); the conditioner's trained part in eval mode."""
        cfg = self.run_config()
        unet = module_from_weights(lambda: build_backbone(cfg.network), self.unet, f"{cfg.backbone} weights", dtype,
                                   device)
        autoencoder = module_from_weights(lambda: build_autoencoder(self.autoencoder_config), self.autoencoder,
                                          "autoencoder weights", dtype, device)
        conditioner = build_conditioner(cfg.conditioning, device, cfg.network.context_dim, self.text_encoder, dtype,
                                        self.tokenizer)
        if conditioner.trainable is not None:
            if self.conditioner is None:
                raise CheckpointError(f"this model needs the weights of its {conditioner.trained_part} "
                                      f"({CONDITIONER_FILE})")
            load_module_weights(conditioner.trainable, self.conditioner, f"{conditioner.trained_part} weights")
            conditioner.trainable.eval()
        check_spatial(cfg.conditioning.spatial, cfg.network.concat_channels, self.autoencoder_config.in_channels,
                      self.autoencoder_config.embed_dim)
        return unet, autoencoder, conditioner

    def to(self, dtype: torch.dtype) -> ModelParts:
        """The same model with every floating-point tensor cast to `dtype` (e.g. fp16 for storage)."""
        def cast(tensors):
            return None if tensors is None else {k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}
        return dataclasses.replace(self, unet=cast(self.unet), autoencoder=cast(self.autoencoder),
                                   text_encoder=cast(self.text_encoder), conditioner=cast(self.conditioner))


def read_native(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> ModelParts:
    """A model folder written by `ldm train` or `save_model(..., "native")`; `dtype` and `device` as in
    `load_model`."""
    folder = Path(folder)
    for path in (folder / CONFIG_FILE, folder / UNET_FILE, folder / AUTOENCODER_DIR / AE_CONFIG_FILE):
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a model folder: {path.relative_to(folder)} is missing "
                                  f"(expected {CONFIG_FILE}, {UNET_FILE} and {AUTOENCODER_DIR}/, as `ldm train` "
                                  "writes them)")
    cfg = load_config(folder / CONFIG_FILE, LDMRunConfig)
    ae_cfg = load_config(folder / AUTOENCODER_DIR / AE_CONFIG_FILE, AutoencoderRunConfig)
    optional = {name: read_weights(folder / name, dtype if name == TEXT_ENCODER_FILE else None, device)
                if (folder / name).is_file() else None for name in (TEXT_ENCODER_FILE, CONDITIONER_FILE)}
    tokenizer = None
    if cfg.conditioning.encoder == "sd3" and (folder / TOKENIZER_DIR).is_dir():  # else beside conditioning.path
        tokenizer = SD3Tokenizers.from_folder(folder / TOKENIZER_DIR, cfg.conditioning)
    elif (folder / TOKENIZER_DIR).is_dir():
        clip = cfg.conditioning.clip or cfg.conditioning.clip_2  # an SDXL refiner has the second encoder only
        tokenizer = ClipTokenizer.from_folder(folder / TOKENIZER_DIR, clip.max_positions, clip.pad_token_id)
    return ModelParts(unet_config=cfg.network, unet=read_weights(folder / UNET_FILE, dtype, device),
                      autoencoder_config=ae_cfg.model,
                      autoencoder=read_weights(folder / AUTOENCODER_DIR / AE_WEIGHTS_FILE, dtype, device),
                      conditioning=cfg.conditioning, diffusion=cfg.diffusion,
                      text_encoder=optional[TEXT_ENCODER_FILE], conditioner=optional[CONDITIONER_FILE],
                      tokenizer=tokenizer, resolution=cfg.data.resolution, sampling=cfg.sampling,
                      recipe=Recipe(cfg.data, cfg.training, ae_cfg))


def write_native(parts: ModelParts, folder: str | os.PathLike) -> None:
    """Write `parts` as a model folder (every file atomically)."""
    folder = Path(folder)
    (folder / AUTOENCODER_DIR).mkdir(parents=True, exist_ok=True)
    save_weights(parts.unet, folder / UNET_FILE)
    save_weights(parts.autoencoder, folder / AUTOENCODER_DIR / AE_WEIGHTS_FILE)
    save_config(parts.autoencoder_run_config(), folder / AUTOENCODER_DIR / AE_CONFIG_FILE)
    for name, tensors in ((TEXT_ENCODER_FILE, parts.text_encoder), (CONDITIONER_FILE, parts.conditioner)):
        if tensors is not None:
            save_weights(tensors, folder / name)
    if parts.tokenizer is not None:
        parts.tokenizer.save_folder(folder / TOKENIZER_DIR)
    save_config(parts.run_config(), folder / CONFIG_FILE)


def detect_format(path: str | os.PathLike) -> Format:
    """Which of the three formats `path` holds, from its files alone (nothing is loaded)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            return "original"
        raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r}; expected a Stable Diffusion "
                              "checkpoint (.safetensors or .ckpt), a model folder or a diffusers folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if (path / CONFIG_FILE).is_file() and (path / UNET_FILE).is_file():
        return "native"
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return "diffusers"
    raise CheckpointError(f"{path} is not a model folder ({CONFIG_FILE} + {UNET_FILE}, as `ldm train` writes) "
                          "nor a diffusers folder (model_index.json, unet/, vae/ ...); it holds: "
                          f"{', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'}")


def load_model(path: str | os.PathLike, fmt: Format | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", **options) -> ModelParts:
    """Read a model in any format (detected when `fmt` is None); `options` go to the format's reader, e.g.
    `prediction_type="v_prediction"` or `config="v2-inference-v.yaml"` for an original checkpoint.

    Weights are read one tensor at a time into their final form: floating-point ones of the UNet, autoencoder and
    text encoder cast to `dtype` (None: as stored; a trained class embedder or text adapter keeps its own), all
    put on `device`. Loading holds each weight once, plus one stored tensor at most (`read_weights`)."""
    fmt = fmt or detect_format(path)
    if fmt == "native":
        if options:
            raise ValueError(f"a native model folder takes no reader options (got {sorted(options)}): its "
                             "config.yaml says it all")
        return read_native(path, dtype, device)
    if fmt == "original":
        from latent_diffusion.formats.original_format import read_original as reader
    elif fmt == "diffusers":
        from latent_diffusion.formats.diffusers_format import read_diffusers as reader
    else:
        raise ValueError(f"unknown model format {fmt!r}; expected one of {', '.join(FORMATS)}")
    takes = [name for name in inspect.signature(reader).parameters if name not in ("path", "folder", "dtype", "device")]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        why = " (t5_tokenizer is for SD3 single files: a diffusers folder has it in tokenizer_3/)" \
            if "t5_tokenizer" in unknown else ""
        raise ValueError(f"{', '.join(unknown)}: not an option of the {fmt} format's reader, which takes "
                         f"{', '.join(takes) or 'none'}{why}")
    return reader(path, dtype=dtype, device=device, **options)


def save_model(parts: ModelParts, path: str | os.PathLike, fmt: Format) -> None:
    """Write `parts` in format `fmt` (original: one file at `path`; native and diffusers: a folder)."""
    if fmt != "native":
        addition = "has no such option (it is this project's addition)"
        for present, what, why in (
                (getattr(parts.unet_config, "position_embedding", False), "unet.position_embedding = True", addition),
                (parts.conditioning.adapter_layers,
                 f"conditioning.adapter_layers = {parts.conditioning.adapter_layers}",
                 "has no place for a trained text adapter"),
                (parts.conditioning.clause_tokens, "conditioning.clause_tokens = True", addition),
                (parts.autoencoder_config.pixel_space, "this is a pixel-space model (autoencoder: pixel)",
                 "needs an autoencoder"),
                (isinstance(parts.unet_config, DiTConfig), "backbone: dit", "holds UNets and SD3's MMDiT only"),
                (isinstance(parts.unet_config, MMDiTConfig) != (parts.conditioning.encoder == "sd3"),
                 f"backbone {type(parts.unet_config).__name__} with encoder '{parts.conditioning.encoder}'",
                 "holds MMDiTs as SD3 models only (encoder 'sd3')"),
                (parts.diffusion.objective == "flow" and parts.conditioning.encoder != "sd3",
                 "diffusion.objective: flow", "describes the VP diffusion process only (and SD3's flow)")):
            if present:
                raise ConfigError(f"{what}: the {fmt} format {why}; keep the model in the native format")
    if fmt == "native":
        write_native(parts, path)
    elif fmt == "original":
        from latent_diffusion.formats.original_format import write_original
        write_original(parts, path)
    elif fmt == "diffusers":
        from latent_diffusion.formats.diffusers_format import write_diffusers
        write_diffusers(parts, path)
    else:
        raise ValueError(f"unknown model format {fmt!r}; expected one of {', '.join(FORMATS)}")
