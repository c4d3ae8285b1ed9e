"""Diffusers folders (`StableDiffusionPipeline.save_pretrained`'s layout) to and from `ModelParts`.

A folder holds `model_index.json`, `unet/`, `vae/` (config.json + diffusion_pytorch_model.safetensors),
`text_encoder/` (a transformers CLIPTextModel: config.json + model.safetensors), `tokenizer/` (vocab.json,
merges.txt, tokenizer_config.json, special_tokens_map.json; transformers 5 writes tokenizer.json in place of the
first two, which the reader takes too) and `scheduler/scheduler_config.json`. Weights and
configs are renamed by the explicit maps of `keymaps` and `diffusers_config`. What diffusers has no field for
(training settings such as `p_uncond`, the sampling defaults of `ldm generate`) is kept in model_index.json under
`_latent_diffusion`, which diffusers ignores, so a folder we write reads back exactly.

The scheduler written is DDIM (PNDM for the 'plms' sampler) with our timestep grid settings; note that diffusers'
Stable Diffusion pipelines override `steps_offset` to 1 and `clip_sample` to False whatever the file says.

The tokenizer is part of the model (SD 2.x pads with "!", SD 1.x with the end token): a folder without
`tokenizer/` is an error rather than a silent fall-back to the bundled CLIP vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.conditioning.clip import ClipTextEncoder
from latent_diffusion.conditioning.registry import conditioner_type
from latent_diffusion.conditioning.spatial import DEFAULT_NOISE_LEVEL, LOW_RES_SCHEDULE
from latent_diffusion.conditioning.text import ClipConditioner
from latent_diffusion.conditioning.tokenizer import END_TOKEN, START_TOKEN, ClipTokenizer
from latent_diffusion.config import (ClipTextConfig, ConditioningConfig, ConfigError, DiffusionConfig, SamplingConfig,
                                     UNetConfig, from_dict, to_dict)
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.files.weights import CheckpointError, load_pickle, place_weights, read_weights, save_weights
from latent_diffusion.formats.diffusers_config import (DIFFUSERS_VERSION, clip_config_from_transformers,
                                                  clip_config_to_transformers, scheduler_class,
                                                  scheduler_config_from_diffusers, scheduler_config_to_diffusers,
                                                  unet_config_from_diffusers, unet_config_to_diffusers,
                                                  vae_config_from_diffusers, vae_config_to_diffusers)
from latent_diffusion.formats.keymaps import (clip_state_from_transformers, clip_state_to_transformers,
                                         drop_last_clip_layer, unet_state_from_diffusers, unet_state_to_diffusers,
                                         vae_state_from_diffusers, vae_state_to_diffusers)
from latent_diffusion.formats import sdxl
from latent_diffusion.formats.sd3 import SD3_PIPELINE
from latent_diffusion.formats.model import ModelParts

MODEL_INDEX = "model_index.json"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
PAD_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")
# (safetensors name, PyTorch pickle name) of each component's weights, without the ".safetensors" / ".bin"
WEIGHT_FILES = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model"),
                "transformer": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "text_encoder_3": ("model", "pytorch_model")}
METADATA_KEY = "_latent_diffusion"
# Settings diffusers has no field for, per config section (kept in model_index.json under METADATA_KEY).
EXTRA_FIELDS = {"diffusion": ("min_snr_gamma", "p_uncond"),
                "sampling": ("prompts", "sampler", "steps", "guidance_scale", "seed"),
                "conditioning": ("max_length", "cache")}
PIPELINES = {"none": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline"}
KNOWN_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor",
                    "image_encoder", "low_res_scheduler", "text_encoder_2", "tokenizer_2")
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"  # SD's x4 upscaler: a noise-augmented low-resolution image


# --- writing -----------------------------------------------------------------------------------------------------

def write_diffusers(parts: ModelParts, folder: str | os.PathLike) -> None:
    """Write `parts` as a diffusers Stable Diffusion folder (all converted first, then every file atomically, and
    model_index.json last)."""
    folder = Path(folder)
    if parts.conditioning.encoder == "sd3":
        from latent_diffusion.formats.sd3_diffusers import write_sd3_diffusers
        return write_sd3_diffusers(parts, folder)
    _check_writable(parts)
    latent_size = parts.resolution // parts.autoencoder_config.downsample_factor
    components = {
        "unet": (unet_config_to_diffusers(parts.unet_config, latent_size),
                 unet_state_to_diffusers(parts.unet_config, parts.unet), "diffusion_pytorch_model.safetensors"),
        "vae": (vae_config_to_diffusers(parts.autoencoder_config),
                vae_state_to_diffusers(parts.autoencoder_config, parts.autoencoder),
                "diffusion_pytorch_model.safetensors")}
    text, tokenizers = (_sdxl_text_components if parts.conditioning.encoder == "sdxl" else _text_components)(parts)
    scheduler = scheduler_config_to_diffusers(parts.diffusion, parts.sampling)
    for name, (config, tensors, weights) in {**components, **text}.items():
        save_weights(tensors, folder / name / weights, metadata={"format": "pt"})
        write_json(config, folder / name / "config.json")
    for name, tokenizer in tokenizers.items():
        write_tokenizer(tokenizer, folder / name)
    write_json(scheduler, folder / SCHEDULER_FILE)
    write_json(model_index(parts), folder / MODEL_INDEX)


def _text_components(parts: ModelParts) -> tuple[dict[str, tuple], dict[str, ClipTokenizer]]:
    """The text encoder (config, weights, file name) and tokenizer of an SD 1.x/2.x model."""
    clip, text_weights = drop_last_clip_layer(parts.conditioning.clip, _text_encoder_weights(parts))
    tokenizer = parts.tokenizer or ClipTokenizer.from_bpe_file(context_length=clip.max_positions,
                                                               pad_id=clip.pad_token_id)
    _check_tokenizer(tokenizer, clip)
    return ({"text_encoder": (clip_config_to_transformers(clip, tokenizer.start_id),
                              clip_state_to_transformers(clip, text_weights), "model.safetensors")},
            {"tokenizer": tokenizer})


def _sdxl_text_components(parts: ModelParts) -> tuple[dict[str, tuple], dict[str, ClipTokenizer]]:
    """SDXL's text encoders (`text_encoder/` when the model has the first, `text_encoder_2/`) and tokenizers."""
    if parts.text_encoder is None:
        raise ConfigError("an SDXL diffusers folder holds its text encoders: this model has them only at "
                          f"conditioning.path = {parts.conditioning.path}")
    encoders = sdxl.split_encoders(parts.text_encoder)
    sdxl.check_encoders(parts.conditioning, encoders, "SDXL text encoder weights")
    vocabulary = parts.tokenizer or ClipTokenizer.from_bpe_file()
    text, tokenizers = {}, {}
    for name, (folder, tokenizer_folder, architecture) in sdxl.DIFFUSERS_PARTS.items():
        cfg = getattr(parts.conditioning, name)
        if cfg is None:
            continue
        tokenizer = sdxl.tokenizer_for(vocabulary, cfg)
        config = clip_config_to_transformers(dataclasses.replace(cfg, layer="last", final_norm=True),
                                             tokenizer.start_id)
        config["architectures"] = [architecture]
        if cfg.projection_dim is not None:
            config["projection_dim"] = cfg.projection_dim
        text[folder] = (config, sdxl.transformers_names(cfg, encoders[name]), "model.safetensors")
        tokenizers[tokenizer_folder] = tokenizer
    return text, tokenizers


def _check_writable(parts: ModelParts) -> None:
    encoder = parts.conditioning.encoder
    if encoder != "sdxl" and not issubclass(conditioner_type(encoder), ClipConditioner):
        raise ConfigError(f"conditioning.encoder = {encoder!r}: a diffusers Stable Diffusion folder needs CLIP "
                          "text encoders")
    spatial = parts.conditioning.spatial
    if encoder == "sdxl" and spatial != "none":
        raise ConfigError(f"conditioning.spatial = {spatial!r}: SDXL models are written with no spatial condition")
    if spatial not in PIPELINES:
        raise ConfigError(f"conditioning.spatial = {spatial!r} has no diffusers Stable Diffusion pipeline "
                          f"(supported: {', '.join(PIPELINES)})")


def _text_encoder_weights(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The CLIP weights of `parts`, or those at `conditioning.path` (a CLIPTextModel or SD 1.x checkpoint)."""
    if parts.text_encoder is not None:
        return parts.text_encoder
    encoder = ClipTextEncoder(parts.conditioning.clip, weights=parts.conditioning.path)
    return encoder.transformer.state_dict()


def _check_tokenizer(tokenizer: ClipTokenizer, clip: ClipTextConfig) -> None:
    pad = clip.eos_token_id if clip.pad_token_id is None else clip.pad_token_id
    if tokenizer.pad_id != pad or tokenizer.end_id != clip.eos_token_id:
        raise ConfigError(f"the tokenizer pads with id {tokenizer.pad_id} and ends with {tokenizer.end_id}, but "
                          f"clip.pad_token_id = {clip.pad_token_id} and clip.eos_token_id = {clip.eos_token_id}")
    if tokenizer.context_length != clip.max_positions:
        raise ConfigError(f"tokenizer context_length {tokenizer.context_length} != clip.max_positions "
                          f"{clip.max_positions}")


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def write_tokenizer(tokenizer: ClipTokenizer, folder: Path) -> None:
    """vocab.json and merges.txt, plus the configs transformers' `CLIPTokenizer` reads (pad token included)."""
    tokenizer.save_folder(folder)
    pad = next(token for token, i in tokenizer.vocab.items() if i == tokenizer.pad_id)
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": pad}
    write_json(special, folder / PAD_TOKEN_FILES[0])
    write_json({"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
                "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special},
               folder / PAD_TOKEN_FILES[1])


def model_index(parts: ModelParts) -> dict[str, Any]:
    """model_index.json: the pipeline's components, and our settings diffusers has no field for."""
    sections = {"diffusion": parts.diffusion, "sampling": parts.sampling, "conditioning": parts.conditioning}
    extra = {name: {k: v for k, v in to_dict(sections[name]).items() if k in fields}
             for name, fields in EXTRA_FIELDS.items()}
    index = {"_class_name": PIPELINES[parts.conditioning.spatial],
             "_diffusers_version": DIFFUSERS_VERSION, METADATA_KEY: extra,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_class(parts.diffusion, parts.sampling.sampler)],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if parts.conditioning.encoder != "sdxl":
        return index
    del index["safety_checker"], index["requires_safety_checker"]
    refiner = parts.conditioning.micro_conditioning == "aesthetic"
    index.update({"_class_name": sdxl.SDXL_PIPELINES[parts.conditioning.micro_conditioning],
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True,
                  **({"requires_aesthetics_score": True} if refiner else {})})
    if parts.conditioning.clip is None:
        index["text_encoder"], index["tokenizer"] = [None, None], [None, None]
    return index


# --- reading -----------------------------------------------------------------------------------------------------

def read_diffusers(folder: str | os.PathLike, prediction_type: str | None = None, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> ModelParts:
    """A diffusers Stable Diffusion 1.x/2.x, SDXL (base or refiner) or SD3 folder as `ModelParts`; `prediction_type`
    overrides the scheduler's; `dtype` and `device` as in `load_model`."""
    folder = Path(folder)
    if (folder / MODEL_INDEX).is_file():
        from latent_diffusion.formats.sd3_diffusers import is_sd3_index, read_sd3_diffusers
        if is_sd3_index(read_json(folder / MODEL_INDEX)):
            if prediction_type is not None:
                raise ConfigError(f"{folder} is an SD3 model (rectified flow): it takes no prediction_type option")
            return read_sd3_diffusers(folder, dtype, device)
    index = _read_index(folder)
    extra = index.get(METADATA_KEY, {})
    unet_cfg, latent_size = unet_config_from_diffusers(*_read_config(folder / "unet" / "config.json"))
    vae_cfg = vae_config_from_diffusers(*_read_config(folder / "vae" / "config.json"))
    if sdxl.is_sdxl_folder(folder, index):
        conditioning, text_encoder, tokenizer = _read_sdxl_text(folder, unet_cfg, extra, dtype, device)
    else:
        text_config, text_path = _read_config(folder / "text_encoder" / "config.json")
        tokenizer = read_tokenizer(folder / "tokenizer", text_config.get("max_position_embeddings", 77))
        clip = clip_config_from_transformers(text_config, tokenizer.end_id, _own_pad(tokenizer), text_path)
        text_encoder = clip_state_from_transformers(clip, *_read_weights(folder, "text_encoder", dtype, device))
        conditioning = _conditioning(unet_cfg, vae_cfg.in_channels, clip, extra, index, folder)
    diffusion, sampling = _read_scheduler(folder / SCHEDULER_FILE, extra, prediction_type)
    return ModelParts(
        unet_config=unet_cfg, autoencoder_config=vae_cfg,
        unet=unet_state_from_diffusers(unet_cfg, *_read_weights(folder, "unet", dtype, device)),
        autoencoder=vae_state_from_diffusers(vae_cfg, *_read_weights(folder, "vae", dtype, device)),
        text_encoder=text_encoder, conditioning=conditioning, diffusion=diffusion, sampling=sampling,
        tokenizer=tokenizer, **({} if latent_size is None else {"resolution": latent_size * vae_cfg.downsample_factor}))


def _own_pad(tokenizer: ClipTokenizer) -> int | None:
    """A CLIP config's pad_token_id for this tokenizer (None: it pads with the end token)."""
    return None if tokenizer.pad_id == tokenizer.end_id else tokenizer.pad_id


def _read_sdxl_text(folder: Path, unet_cfg: UNetConfig, extra: dict[str, Any], dtype: torch.dtype | None,
                    device: str | torch.device) -> tuple[ConditioningConfig, dict[str, torch.Tensor], ClipTokenizer]:
    """(conditioning, our-named `clip.*`/`clip_2.*` weights, the vocabulary) of an SDXL folder's text encoders."""
    configs, weights, tokenizers = {}, {}, []
    for name, (component, tokenizer_folder, _) in sdxl.DIFFUSERS_PARTS.items():
        if name == "clip" and not (folder / component / "config.json").is_file():
            continue  # the refiner has the second encoder only
        text_config, path = _read_config(folder / component / "config.json")
        tokenizer = read_tokenizer(folder / tokenizer_folder, text_config.get("max_position_embeddings", 77))
        cfg = clip_config_from_transformers(text_config, tokenizer.end_id, _own_pad(tokenizer), path)
        if name == "clip_2":
            cfg = dataclasses.replace(cfg, projection_dim=int(text_config.get("projection_dim", 512)))
        configs[name] = cfg
        weights[name] = sdxl.from_transformers(cfg, *_read_weights(folder, component, dtype, device))
        tokenizers.append(tokenizer)
    if len(tokenizers) == 2:
        sdxl.check_same_vocabulary(*tokenizers, str(folder))
    conditioning = sdxl.sdxl_conditioning(configs.get("clip"), configs["clip_2"], unet_cfg, str(folder))
    ours = {k: v for k, v in extra.get("conditioning", {}).items() if k in EXTRA_FIELDS["conditioning"]}
    return dataclasses.replace(conditioning, **ours), sdxl.joined(weights), tokenizers[0]


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    return read_json(path), str(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with a clear error for a missing or malformed file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a diffusers Stable Diffusion folder holds model_index.json, "
                              "unet/, vae/, text_encoder/, tokenizer/ and scheduler/, each with its config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_index(folder: Path) -> dict[str, Any]:
    """model_index.json (optional), checked for components this reader cannot load (e.g. SDXL's text_encoder_2)."""
    if not (folder / MODEL_INDEX).is_file():
        return {}
    index = read_json(folder / MODEL_INDEX)
    pipeline = index.get("_class_name")
    known = (*PIPELINES.values(), UPSCALE_PIPELINE, *sdxl.SDXL_PIPELINES.values(), SD3_PIPELINE)
    if isinstance(pipeline, str) and pipeline not in known and "transformer" in index:
        raise ConfigError(f"{folder / MODEL_INDEX}: {pipeline} (a transformer backbone, e.g. FLUX or PixArt) is not "
                          f"supported; supported pipelines: {', '.join(known)}")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if name not in KNOWN_COMPONENTS and value != [None, None]:
            raise ConfigError(f"{folder / MODEL_INDEX}: component {name} = {value} is not supported (Stable "
                              f"Diffusion 1.x/2.x folders have {', '.join(KNOWN_COMPONENTS[:5])})")
    text_encoder = index.get("text_encoder", ["transformers", "CLIPTextModel"])
    refiner = text_encoder == [None, None] and "text_encoder_2" in index
    if text_encoder[1:] != ["CLIPTextModel"] and not refiner:
        raise ConfigError(f"{folder / MODEL_INDEX}: text_encoder = {text_encoder} is not supported (expected "
                          "transformers' CLIPTextModel)")
    return index


def read_tokenizer(folder: Path, context_length: int = 77) -> ClipTokenizer:
    """The CLIP tokenizer of a `tokenizer/` folder, padding with its configured pad token (default: the end token)."""
    try:
        tokenizer = ClipTokenizer.from_folder(folder, context_length)
    except FileNotFoundError as exc:
        raise CheckpointError(f"a diffusers folder needs its CLIP tokenizer: {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    pad = _pad_token(folder)
    if pad is None:
        return tokenizer
    if pad not in tokenizer.vocab:
        raise CheckpointError(f"{folder}: the pad token {pad!r} is not in the tokenizer's vocabulary")
    return ClipTokenizer(tokenizer.vocab, tokenizer.merges, context_length, tokenizer.vocab[pad])


def _pad_token(folder: Path) -> str | None:
    for name in PAD_TOKEN_FILES:
        if (folder / name).is_file():
            pad = read_json(folder / name).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return None


def _read_scheduler(path: Path, extra: dict[str, Any], prediction_type: str | None
                    ) -> tuple[DiffusionConfig, SamplingConfig]:
    """The forward process and grid settings of scheduler_config.json, plus our settings from model_index.json."""
    config = read_json(path)
    diffusion, sampling = scheduler_config_from_diffusers(config, str(path))
    if prediction_type is not None:
        diffusion["prediction_type"] = prediction_type
    diffusion = from_dict(DiffusionConfig, {**extra.get("diffusion", {}), **diffusion}, "diffusion")
    ours = extra.get("sampling", {})
    # the sampler we wrote, unless the scheduler was changed since; else the scheduler's own sampler
    if "sampler" in ours and scheduler_class(diffusion, ours["sampler"]) == config.get("_class_name"):
        sampling["sampler"] = ours["sampler"]
    if sampling["sampler"] is None:
        del sampling["sampler"]
    return diffusion, from_dict(SamplingConfig, {**ours, **sampling}, "sampling")


def _conditioning(unet_cfg: UNetConfig, image_channels: int, clip: ClipTextConfig, extra: dict[str, Any],
                  index: dict[str, Any], folder: Path) -> ConditioningConfig:
    conditioning = from_dict(ConditioningConfig, extra.get("conditioning", {}), "conditioning")
    conditioning = dataclasses.replace(conditioning, encoder="clip", clip=clip)
    if unet_cfg.concat_channels == 0:
        return conditioning
    if index.get("_class_name") == UPSCALE_PIPELINE and unet_cfg.concat_channels == image_channels:
        _check_low_res_scheduler(folder / "low_res_scheduler" / "scheduler_config.json")
        return dataclasses.replace(conditioning, spatial="low_res", noise_level=DEFAULT_NOISE_LEVEL)
    if unet_cfg.concat_channels != unet_cfg.out_channels + 1:
        raise ConfigError(f"unet in_channels = {unet_cfg.in_channels} with out_channels = {unet_cfg.out_channels}: "
                          "only plain (in = out), inpainting (in = 2·out + 1) and x4-upscaler (in = out + image "
                          "channels) UNets are supported")
    return dataclasses.replace(conditioning, spatial="inpaint")


def _check_low_res_scheduler(path: Path) -> None:
    """The upscaler's noise augmentation must be `LOW_RES_SCHEDULE`'s (the one released x4 upscaler's)."""
    config = read_json(path)
    schedule = LOW_RES_SCHEDULE[0]
    found = (config.get("beta_schedule"), config.get("beta_start"), config.get("beta_end"),
             config.get("num_train_timesteps"))
    numbers = all(isinstance(a, (int, float)) for a in found[1:])
    if found[0] != schedule or not numbers or any(abs(a - b) > 1e-9 for a, b in zip(found[1:], LOW_RES_SCHEDULE[1:])):
        raise ConfigError(f"{path}: a noise-augmentation schedule {found} (beta_schedule, beta_start, beta_end, "
                          f"num_train_timesteps) is not supported; expected {LOW_RES_SCHEDULE}")


def _read_weights(folder: Path, component: str, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """The weights of `folder/component` (safetensors, else a PyTorch .bin, else fp16 variants) and their path;
    `dtype` and `device` as in `read_weights`."""
    stem, bin_stem = WEIGHT_FILES[component]
    names = [f"{stem}.safetensors", f"{bin_stem}.bin", f"{stem}.fp16.safetensors", f"{bin_stem}.fp16.bin"]
    index = folder / component / f"{stem}.safetensors.index.json"
    if index.is_file() and not (folder / component / names[0]).is_file():  # sharded (e.g. SD3's T5-XXL)
        return _read_shards(index, dtype, device), str(index)
    for name in names:
        path = folder / component / name
        if path.is_file():
            tensors = (read_weights(path, dtype, device) if path.suffix == ".safetensors"
                       else place_weights(load_bin(path), dtype, device))
            return tensors, str(path)
    present = sorted(p.name for p in (folder / component).iterdir()) if (folder / component).is_dir() else []
    raise CheckpointError(f"{folder / component}: no weights file; expected one of {', '.join(names)} (or a "
                          f"sharded {stem}.safetensors.index.json); found: {', '.join(present) or 'nothing'}")


def _read_shards(index: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a sharded safetensors checkpoint, by its index's `weight_map`."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a weight_map of tensor names to shard files")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index} names the shard {shard}, which is missing")
        tensors.update(read_weights(path, dtype, device))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors of its weight_map are in no shard (e.g. {missing[:3]})")
    return tensors


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle of tensors, read with `weights_only=True` (no code runs)."""
    tensors = load_pickle(path)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path}: expected a dictionary of tensors")
    return tensors
