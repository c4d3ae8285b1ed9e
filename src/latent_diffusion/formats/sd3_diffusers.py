"""SD3 diffusers folders (`StableDiffusion3Pipeline`) ↔ `ModelParts`; the maps are `formats/sd3.py`'s."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.conditioning.sd3 import SD3Tokenizers
from latent_diffusion.conditioning.t5 import T5Tokenizer
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ConfigError, DiffusionConfig, SamplingConfig
from latent_diffusion.files.weights import CheckpointError, save_weights
from latent_diffusion.formats import sd3
from latent_diffusion.formats.diffusers_config import (clip_config_from_transformers, clip_config_to_transformers,
                                                       vae_config_from_diffusers, vae_config_to_diffusers)
from latent_diffusion.formats.diffusers_format import (MODEL_INDEX, SCHEDULER_FILE, _own_pad, _read_config,
                                                       _read_weights, read_json, read_tokenizer, write_json,
                                                       write_tokenizer)
from latent_diffusion.formats.keymaps import vae_state_from_diffusers, vae_state_to_diffusers
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.formats.sdxl import check_same_vocabulary, tokenizer_for

WEIGHTS = "diffusion_pytorch_model.safetensors"
_SCHEDULER_FIXED = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                    "stochastic_sampling": False}


def is_sd3_index(index: dict[str, Any]) -> bool:
    """Whether a model_index.json is an SD3 pipeline's."""
    pipeline = index.get("_class_name")
    return (isinstance(pipeline, str) and pipeline.startswith("StableDiffusion3")
            or index.get("transformer", [None, None])[1:] == ["SD3Transformer2DModel"])


def write_sd3_diffusers(parts: ModelParts, folder: Path) -> None:
    """`parts` (an SD3 model) as a `StableDiffusion3Pipeline` folder; model_index.json last."""
    cond = parts.conditioning
    if parts.text_encoder is None:
        raise ConfigError("an SD3 diffusers folder holds its text encoders: this model has them only at "
                          f"conditioning.path = {cond.path}")
    tokenizers = parts.tokenizer if isinstance(parts.tokenizer, SD3Tokenizers) else None
    if cond.t5 is not None and (tokenizers is None or tokenizers.t5 is None):
        raise ConfigError("this SD3 model has no T5 tokenizer to write (tokenizer_3/)")
    latent_size = parts.resolution // parts.autoencoder_config.downsample_factor
    components = {"transformer": (sd3.mmdit_config_to_diffusers(parts.unet_config, latent_size),
                                  sd3.mmdit_state_to_diffusers(parts.unet_config, parts.unet), WEIGHTS),
                  "vae": (vae_config_to_diffusers(parts.autoencoder_config),
                          vae_state_to_diffusers(parts.autoencoder_config, parts.autoencoder), WEIGHTS)}
    text = sd3.text_to_transformers(cond, parts.text_encoder)
    vocabulary = tokenizers.clip if tokenizers is not None else ClipTokenizer.from_bpe_file()
    for name in sd3.CLIP_NAMES:
        cfg = getattr(cond, name)
        full = dataclasses.replace(cfg, layer="last", final_norm=True)
        tokenizer = tokenizer_for(vocabulary, cfg)
        config = clip_config_to_transformers(full, tokenizer.start_id)
        config.update(architectures=["CLIPTextModelWithProjection"], projection_dim=cfg.projection_dim)
        component, tokenizer_folder, _ = sd3.DIFFUSERS_TEXT[name]
        components[component] = (config, text[name], "model.safetensors")
        write_tokenizer(tokenizer, folder / tokenizer_folder)
    if cond.t5 is not None:
        config = {**cond.t5, "architectures": ["T5EncoderModel"]}
        components["text_encoder_3"] = (config, text["t5"], "model.safetensors")
        tokenizers.t5.save_folder(folder / "tokenizer_3")
    for name, (config, tensors, weights) in components.items():
        save_weights(tensors, folder / name / weights, metadata={"format": "pt"})
        write_json(config, folder / name / "config.json")
    sampler = parts.sampling.sampler
    scheduler_class = next((c for c, s in sd3.FLOW_SCHEDULERS.items() if s == sampler), None)
    if scheduler_class is None:
        raise ConfigError(f"sampling.sampler = {sampler!r}: an SD3 folder's scheduler is a flow sampler "
                          f"({', '.join(sd3.FLOW_SCHEDULERS.values())})")
    write_json({"_class_name": scheduler_class, "_diffusers_version": "0.30.0",
                "num_train_timesteps": parts.diffusion.num_timesteps, "shift": parts.diffusion.flow_shift},
               folder / SCHEDULER_FILE)
    t5 = cond.t5 is not None
    write_json({"_class_name": sd3.SD3_PIPELINE, "_diffusers_version": "0.30.0",
                "scheduler": ["diffusers", scheduler_class], "transformer": ["diffusers", "SD3Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
                "image_encoder": [None, None], "feature_extractor": [None, None]}, folder / MODEL_INDEX)


def read_sd3_diffusers(folder: Path, dtype: torch.dtype | None, device: str | torch.device) -> ModelParts:
    """A `StableDiffusion3Pipeline` folder as `ModelParts` (without text_encoder_3/: a model run without T5)."""
    mmdit_cfg, sample_size = sd3.mmdit_config_from_diffusers(*_read_config(folder / "transformer" / "config.json"))
    vae_cfg = vae_config_from_diffusers(*_read_config(folder / "vae" / "config.json"))
    configs, parts, clip_tokenizers = {}, {}, []
    for name in sd3.CLIP_NAMES:
        component, tokenizer_folder, _ = sd3.DIFFUSERS_TEXT[name]
        text_config, path = _read_config(folder / component / "config.json")
        tokenizer = read_tokenizer(folder / tokenizer_folder, text_config.get("max_position_embeddings", 77))
        cfg = clip_config_from_transformers(text_config, tokenizer.end_id, _own_pad(tokenizer), path)
        configs[name] = dataclasses.replace(cfg, projection_dim=int(text_config.get("projection_dim", 512)))
        parts[name] = _read_weights(folder, component, dtype, device)[0]
        clip_tokenizers.append(tokenizer)
    check_same_vocabulary(*clip_tokenizers, str(folder))
    t5_config, t5_folder = None, None
    if (folder / "text_encoder_3" / "config.json").is_file():
        t5_config = {k: v for k, v in read_json(folder / "text_encoder_3" / "config.json").items()
                     if not k.startswith("_") and k not in ("architectures", "transformers_version")}
        parts["t5"] = _read_weights(folder, "text_encoder_3", dtype, device)[0]
        t5_folder = folder / "tokenizer_3"
    conditioning = sd3.sd3_conditioning(configs["clip"], configs["clip_2"], t5_config)
    diffusion, sampling = _read_flow_scheduler(folder / SCHEDULER_FILE)
    return ModelParts(
        unet_config=mmdit_cfg, autoencoder_config=vae_cfg,
        unet=sd3.mmdit_state_from_diffusers(mmdit_cfg, _read_weights(folder, "transformer", dtype, device)[0]),
        autoencoder=vae_state_from_diffusers(vae_cfg, *_read_weights(folder, "vae", dtype, device)),
        text_encoder=sd3.text_from_transformers(conditioning, parts, str(folder)), conditioning=conditioning,
        diffusion=diffusion, sampling=sampling,
        tokenizer=SD3Tokenizers(clip_tokenizers[0], None if t5_folder is None
                                else T5Tokenizer.from_folder(t5_folder, conditioning.t5_max_length)),
        resolution=sample_size * vae_cfg.downsample_factor)


def _read_flow_scheduler(path: Path) -> tuple[DiffusionConfig, SamplingConfig]:
    """The flow settings of a FlowMatch scheduler's config (other schedulers are refused)."""
    config = read_json(path)
    name = config.get("_class_name")
    if name not in sd3.FLOW_SCHEDULERS:
        raise CheckpointError(f"{path}: scheduler {name!r} is not supported for an SD3 model (expected "
                              f"{' or '.join(sd3.FLOW_SCHEDULERS)})")
    for field, value in _SCHEDULER_FIXED.items():
        if config.get(field, value) != value:
            raise CheckpointError(f"{path}: {field} = {config[field]!r} is not supported (expected {value!r})")
    diffusion = dataclasses.replace(sd3.SD3_DIFFUSION, flow_shift=float(config.get("shift", 1.0)),
                                    num_timesteps=int(config.get("num_train_timesteps", 1000)))
    return diffusion, dataclasses.replace(sd3.SD3_SAMPLING, sampler=sd3.FLOW_SCHEDULERS[name])
