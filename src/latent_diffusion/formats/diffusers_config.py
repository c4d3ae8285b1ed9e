"""Explicit config maps between our dataclasses and diffusers / transformers `config.json` files.

Each `*_to_*` writes every field the foreign class reads; each `*_from_*` reads one, rejecting (with `ConfigError`,
naming the field and value) any setting our modules do not implement, e.g. SDXL's `addition_embed_type`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from latent_diffusion.config import (AutoencoderConfig, ClipTextConfig, ConfigError, DiffusionConfig, SamplingConfig,
                                     UNetConfig)
from latent_diffusion.diffusion.schedule import linear_betas, scaled_linear_betas

DIFFUSERS_VERSION = "0.30.0"  # written as `_diffusers_version`; >= 0.9 so no legacy config patching applies
DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default when a config has no `scaling_factor`
UNET_NORM_EPS = 1e-5  # our ResBlocks' GroupNorm eps (torch's default)
BLOCKS = {"down": ("DownBlock2D", "CrossAttnDownBlock2D"), "up": ("UpBlock2D", "CrossAttnUpBlock2D")}
FOREIGN_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

# Settings of UNet2DConditionModel that SD 1.x/2.x UNets leave at these values; anything else is not implemented.
_UNET_FIXED: dict[str, Any] = {
    "class_embed_type": None, "encoder_hid_dim_type": None, "encoder_hid_dim": None,
    "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn", "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_dim": None,
    "time_cond_proj_dim": None, "timestep_post_act": None,
    "time_embedding_act_fn": None, "attention_type": "default", "center_input_sample": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "cross_attention_norm": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None, "norm_eps": UNET_NORM_EPS,
}
# SDXL's vector condition: the pooled text embedding and 256 Fourier features per micro-conditioning number
ADDITION_EMBED_TYPE, ADDITION_TIME_EMBED_DIM = "text_time", 256
_UNET_READ = {"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
              "block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
              "transformer_layers_per_block", "use_linear_projection", "norm_num_groups", "num_class_embeds",
              "dropout", "upcast_attention", "addition_embed_type_num_heads",  # upcast: fp16 precision only
              "only_cross_attention", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim"}
_VAE_FIXED: dict[str, Any] = {"act_fn": "silu", "latents_mean": None, "latents_std": None,
                              "mid_block_add_attention": True}
_VAE_READ = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "force_upcast",
             "shift_factor", "use_quant_conv", "use_post_quant_conv"}
# The values diffusers fills in for fields a config.json leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "UNet2DConditionModel": {"sample_size": None, "in_channels": 4, "out_channels": 4,
                             "down_block_types": list(BLOCKS["down"][1:]) * 3 + ["DownBlock2D"],
                             "up_block_types": ["UpBlock2D"] + list(BLOCKS["up"][1:]) * 3,
                             "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                             "attention_head_dim": 8, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
                             "use_linear_projection": False, "norm_num_groups": 32, "num_class_embeds": None,
                             "dropout": 0.0, "only_cross_attention": False},
    "AutoencoderKL": {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
                      "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
                      "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
                      "scaling_factor": DEFAULT_SCALING_FACTOR},
}


def _same(value: Any, expected: Any) -> bool:
    """Whether a config value is the supported one (numbers compared as numbers; False counts as None: off)."""
    if isinstance(value, list):  # per-block settings, e.g. only_cross_attention: [false, false, ...]
        return all(_same(v, expected) for v in value)
    if _is_number(value) and _is_number(expected):
        return math.isclose(value, expected, rel_tol=1e-6)
    if expected is None and value is False:
        return True
    return value == expected and type(value) is type(expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_supported(config: dict[str, Any], fixed: dict[str, Any], read: set[str], what: str) -> None:
    """Raise `ConfigError` for a field set to a value our modules do not implement (unknown fields must be off)."""
    for key, value in config.items():
        if key in fixed and not _same(value, fixed[key]):
            raise ConfigError(f"{what}: {key} = {value!r} is not supported (only {fixed[key]!r}, as in Stable "
                              "Diffusion 1.x/2.x)")
        if key not in fixed and key not in read and not key.startswith("_") and value not in (None, False):
            raise ConfigError(f"{what}: unknown setting {key} = {value!r}; this reader handles Stable Diffusion "
                              "1.x/2.x components")


def _one(value: Any, field: str, what: str) -> Any:
    """A per-block setting that must be the same for every block, as one value."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(set(map(repr, value))) != 1:
        raise ConfigError(f"{what}: {field} = {list(value)} differs between blocks; only one value is supported")
    return value[0]


def _multipliers(widths: list[int], field: str, what: str) -> tuple[int, tuple[int, ...]]:
    base = widths[0]
    if any(w % base for w in widths):
        raise ConfigError(f"{what}: {field} = {widths}: expected multiples of the first width {base}")
    return base, tuple(w // base for w in widths)


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """A `UNet2DConditionModel` config.json for our UNet (`sample_size`: the latent size it was trained at)."""
    if cfg.context_dim is None:
        raise ConfigError("unet.context_dim = None: a diffusers UNet2DConditionModel needs cross-attention "
                          "(only text-conditioned models can be written as diffusers folders)")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attention = [2**level in cfg.attention_resolutions for level in range(len(widths))]
    heads = cfg.num_heads if cfg.num_head_channels == -1 else [w // cfg.num_head_channels for w in widths]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": [BLOCKS["down"][a] for a in attention],
            "up_block_types": [BLOCKS["up"][a] for a in reversed(attention)],
            "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
            "attention_head_dim": heads,  # diffusers' (misnamed) heads per level, see diffusers#2011
            "cross_attention_dim": cfg.context_dim,
            "transformer_layers_per_block": (cfg.transformer_depth if isinstance(cfg.transformer_depth, int)
                                             else list(cfg.transformer_depth)),
            "use_linear_projection": cfg.use_linear_in_transformer, "norm_num_groups": cfg.norm_groups,
            "num_class_embeds": cfg.num_classes, "dropout": cfg.dropout, "upcast_attention": False,
            "only_cross_attention": list(cfg.disable_self_attentions or ()) or False, **_UNET_FIXED,
            **_addition_embedding_to_diffusers(cfg)}


def _addition_embedding_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    if cfg.adm_in_channels is None:
        return {"addition_embed_type": None, "addition_time_embed_dim": None,
                "projection_class_embeddings_input_dim": None}
    return {"addition_embed_type": ADDITION_EMBED_TYPE, "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels}


def _addition_embedding_from_diffusers(config: dict[str, Any], what: str) -> int | None:
    """`adm_in_channels` of SDXL's `text_time` addition embedding (None: no addition embedding)."""
    kind = config.get("addition_embed_type")
    if kind is None:
        return None
    time_dim = config.get("addition_time_embed_dim")
    if kind != ADDITION_EMBED_TYPE or time_dim != ADDITION_TIME_EMBED_DIM:
        raise ConfigError(f"{what}: addition_embed_type = {kind!r} with addition_time_embed_dim = {time_dim!r} is not "
                          f"supported (only SDXL's {ADDITION_EMBED_TYPE!r} with {ADDITION_TIME_EMBED_DIM})")
    width = config.get("projection_class_embeddings_input_dim")
    if not isinstance(width, int) or width <= 0:
        raise ConfigError(f"{what}: projection_class_embeddings_input_dim = {width!r}: expected the vector width")
    return width


def _depths(value: Any, levels: int, what: str) -> int | tuple[int, ...]:
    """Our transformer_depth of diffusers' `transformer_layers_per_block` (one number, or one per down block)."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != levels or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{what}: transformer_layers_per_block = {list(value)}: expected one number per block "
                          f"({levels})")
    return value[0] if len(set(value)) == 1 else tuple(value)


def _attention_levels(config: dict[str, Any], what: str) -> list[bool]:
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for kind, types in (("down", down), ("up", up)):
        for i, name in enumerate(types):
            if name not in BLOCKS[kind]:
                raise ConfigError(f"{what}: {kind}_block_types[{i}] = {name!r} is not supported (expected "
                                  f"{' or '.join(BLOCKS[kind])})")
    attention = [BLOCKS["down"].index(name) == 1 for name in down]
    if [BLOCKS["up"].index(name) == 1 for name in reversed(up)] != attention or len(up) != len(down):
        raise ConfigError(f"{what}: up_block_types {up} do not mirror down_block_types {down}")
    return attention


def _heads(value: Any, widths: list[int], what: str) -> dict[str, int]:
    """Our num_heads / num_head_channels from diffusers' `attention_head_dim` (heads per level)."""
    if not isinstance(value, (list, tuple)):
        return {"num_heads": value}
    if len(value) != len(widths):
        raise ConfigError(f"{what}: attention_head_dim = {list(value)}: expected one entry per block")
    per_head = {w // h for w, h in zip(widths, value, strict=True)}
    if len(per_head) == 1 and all(w % h == 0 for w, h in zip(widths, value, strict=True)):
        return {"num_head_channels": per_head.pop()}
    return {"num_heads": _one(value, "attention_head_dim", what)}


def unet_config_from_diffusers(config: dict[str, Any], what: str = "unet/config.json"
                               ) -> tuple[UNetConfig, int | None]:
    """Our `UNetConfig` and the latent sample size (if set) of a `UNet2DConditionModel` config.json.

    attention_resolutions come deepest first, as CompVis writes them; num_heads keeps its default when the heads
    have a fixed width (num_head_channels)."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConfigError(f"{what}: _class_name = {config['_class_name']!r} is not supported "
                          "(expected UNet2DConditionModel)")
    check_supported(config, _UNET_FIXED, _UNET_READ | set(FOREIGN_KEYS), what)
    config = {**_DEFAULTS["UNet2DConditionModel"], **config}
    attention = _attention_levels(config, what)
    widths = list(config["block_out_channels"])
    model_channels, channel_mult = _multipliers(widths, "block_out_channels", what)
    in_ch, out_ch = config["in_channels"], config["out_channels"]
    cfg = UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=model_channels, channel_mult=channel_mult,
                     num_res_blocks=_one(config["layers_per_block"], "layers_per_block", what),
                     attention_resolutions=tuple(2**i for i in reversed(range(len(attention))) if attention[i]),
                     **_heads(config["attention_head_dim"], widths, what),
                     transformer_depth=_depths(config["transformer_layers_per_block"], len(widths), what),
                     adm_in_channels=_addition_embedding_from_diffusers(config, what),
                     context_dim=_one(config["cross_attention_dim"], "cross_attention_dim", what),
                     use_linear_in_transformer=config["use_linear_projection"], num_classes=config["num_class_embeds"],
                     concat_channels=max(in_ch - out_ch, 0), dropout=float(config["dropout"]),
                     norm_groups=config["norm_num_groups"],
                     disable_self_attentions=_self_attention_off(config["only_cross_attention"], len(widths), what))
    return cfg, _one(config["sample_size"], "sample_size", what)


def _self_attention_off(value: Any, levels: int, what: str) -> tuple[bool, ...] | None:
    """Our `disable_self_attentions` of diffusers' `only_cross_attention` (one flag per down block; the up blocks
    take them in reverse, as CompVis' output blocks take their level's)."""
    if not isinstance(value, (list, tuple)):
        if value:  # one True covers the middle block too (mid_block_only_cross_attention), which CompVis never did
            raise ConfigError(f"{what}: only_cross_attention = {value!r} is not supported (only per-block flags, "
                              "the middle block keeping self-attention)")
        return None
    if len(value) != levels:
        raise ConfigError(f"{what}: only_cross_attention = {list(value)}: expected one flag per block ({levels})")
    return tuple(bool(v) for v in value) if any(value) else None


def vae_config_to_diffusers(cfg: AutoencoderConfig) -> dict[str, Any]:
    """An `AutoencoderKL` config.json for our autoencoder (`scaling_factor` is our `latent_scale`)."""
    for ok, field, value, expected in (
            (cfg.regularizer == "kl", "regularizer", cfg.regularizer,
             "kl (a VQ first stage is written as our model folder or an original checkpoint)"),
            (not cfg.attn_resolutions, "attn_resolutions", cfg.attn_resolutions, "[] (attention only in the middle)"),
            (cfg.ch_mult[0] == 1, "ch_mult", cfg.ch_mult, "a first multiplier of 1"),
            (cfg.embed_dim == cfg.z_channels, "embed_dim", cfg.embed_dim, f"z_channels = {cfg.z_channels}")):
        if not ok:
            raise ConfigError(f"autoencoder {field} = {value!r}: diffusers' AutoencoderKL needs {expected}")
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups, "sample_size": cfg.resolution,
            "scaling_factor": cfg.latent_scale, "shift_factor": cfg.latent_shift or None,
            "use_quant_conv": cfg.quant_conv, "use_post_quant_conv": cfg.quant_conv, "force_upcast": True, **_VAE_FIXED}


def vae_config_from_diffusers(config: dict[str, Any], what: str = "vae/config.json") -> AutoencoderConfig:
    """Our `AutoencoderConfig` of an `AutoencoderKL` config.json (dropout 0: diffusers' VAE has none)."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"{what}: _class_name = {config['_class_name']!r} is not supported (expected AutoencoderKL; "
                          "a VQ first stage loads from our model folders and original checkpoints)")
    check_supported(config, _VAE_FIXED, _VAE_READ | set(FOREIGN_KEYS), what)
    config = {**_DEFAULTS["AutoencoderKL"], **config}
    widths = list(config["block_out_channels"])
    for field, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(config[field]) != [name] * len(widths):
            raise ConfigError(f"{what}: {field} = {config[field]} is not supported (expected {len(widths)} × {name})")
    ch, ch_mult = _multipliers(widths, "block_out_channels", what)
    quant_conv = config.get("use_quant_conv", True)
    if config.get("use_post_quant_conv", True) != quant_conv:
        raise ConfigError(f"{what}: use_quant_conv = {quant_conv} with use_post_quant_conv = "
                          f"{config.get('use_post_quant_conv')} is not supported (both, or neither as in SD3's VAE)")
    return AutoencoderConfig(in_channels=config["in_channels"], out_channels=config["out_channels"], ch=ch,
                             ch_mult=ch_mult, num_res_blocks=config["layers_per_block"],
                             z_channels=config["latent_channels"], embed_dim=config["latent_channels"],
                             resolution=_one(config["sample_size"], "sample_size", what),
                             norm_groups=config["norm_num_groups"], latent_scale=float(config["scaling_factor"]),
                             latent_shift=float(config.get("shift_factor") or 0.0), quant_conv=bool(quant_conv))


def clip_config_to_transformers(cfg: ClipTextConfig, bos_token_id: int) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` config.json; our 'penultimate' models must first drop their last layer."""
    if cfg.layer != "last":
        raise ConfigError("clip.layer = 'penultimate' has no CLIPTextModel equivalent: drop the last layer first")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.mlp_width, "max_position_embeddings": cfg.max_positions,
            "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps, "bos_token_id": bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id,
            "attention_dropout": 0.0, "dropout": 0.0}


def clip_config_from_transformers(config: dict[str, Any], eos_token_id: int, pad_token_id: int | None,
                                  what: str = "text_encoder/config.json") -> ClipTextConfig:
    """Our `ClipTextConfig` ('last' layer) of a `CLIPTextModel` config.json; end and pad ids come from the tokenizer
    (the config's own are unused by the model and legacy in SD folders: eos 2, pad 1)."""
    for field, allowed in (("architectures", (["CLIPTextModel"], ["CLIPTextModelWithProjection"])),
                           ("model_type", ("clip_text_model",)),
                           ("hidden_act", ("quick_gelu", "gelu"))):
        if field in config and config[field] not in allowed:
            raise ConfigError(f"{what}: {field} = {config[field]!r} is not supported (expected "
                              f"{' or '.join(map(repr, allowed))})")
    defaults = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5}  # transformers' CLIPTextConfig defaults
    c = {**defaults, **config}
    return ClipTextConfig(vocab_size=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"],
                          heads=c["num_attention_heads"], mlp_width=c["intermediate_size"],
                          max_positions=c["max_position_embeddings"], hidden_act=c["hidden_act"],
                          layer_norm_eps=float(c["layer_norm_eps"]), layer="last", eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id)


BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
SAMPLER_OF_SCHEDULER = {"DDIMScheduler": "ddim", "PNDMScheduler": "plms", "DDPMScheduler": "ddpm",
                        "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                        "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpmpp_2m"}
GRID_FIELDS = ("timestep_spacing", "set_alpha_to_one")  # SamplingConfig fields that are None for "the default"


def beta_range(schedule: str) -> tuple[float, float] | None:
    """(β_start, β_end) of our named schedule (None for cosine, which has no range)."""
    betas = {"linear": linear_betas, "scaled_linear": scaled_linear_betas}.get(schedule)
    if betas is None:
        return None
    parameters = inspect.signature(betas).parameters
    return parameters["beta_start"].default, parameters["beta_end"].default


def scheduler_class(diffusion: DiffusionConfig, sampler: str) -> str:
    """The diffusers scheduler written for a model: PNDM for 'plms' where it can express the schedule, else DDIM."""
    pndm_ok = not diffusion.zero_terminal_snr and diffusion.prediction_type != "sample"
    return "PNDMScheduler" if sampler == "plms" and pndm_ok else "DDIMScheduler"


def scheduler_config_to_diffusers(diffusion: DiffusionConfig, sampling: SamplingConfig) -> dict[str, Any]:
    """A DDIM or PNDM scheduler_config.json of our forward process and timestep grid; grid settings that are None
    are left out, so the scheduler's default applies (our samplers share diffusers' defaults)."""
    name = scheduler_class(diffusion, sampling.sampler)
    config = {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION,
              "num_train_timesteps": diffusion.num_timesteps, "beta_schedule": BETA_SCHEDULES[diffusion.schedule],
              "trained_betas": None, "prediction_type": diffusion.prediction_type,
              "steps_offset": sampling.steps_offset}
    betas = diffusion.beta_range or beta_range(diffusion.schedule)
    if betas is not None:
        config["beta_start"], config["beta_end"] = betas
    if name == "DDIMScheduler":
        config.update(clip_sample=False, rescale_betas_zero_snr=diffusion.zero_terminal_snr)
    else:
        config["skip_prk_steps"] = True
    for field in GRID_FIELDS:
        if getattr(sampling, field) is not None:
            config[field] = getattr(sampling, field)
    return config


def scheduler_config_from_diffusers(config: dict[str, Any], what: str = "scheduler/scheduler_config.json"
                                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DiffusionConfig fields, SamplingConfig fields) of a scheduler_config.json, diffusers' defaults filling the
    gaps; `sampler` is None for a scheduler we have no sampler for. `clip_sample` is ignored, as diffusers' Stable
    Diffusion pipelines turn it off."""
    for field, off in (("trained_betas", None), ("thresholding", False)):
        if config.get(field, off) != off:
            raise ConfigError(f"{what}: {field} = {config[field]!r} is not supported (expected {off!r})")
    name = config.get("beta_schedule", "linear")
    schedule = {theirs: ours for ours, theirs in BETA_SCHEDULES.items()}.get(name)
    if schedule is None:
        raise ConfigError(f"{what}: beta_schedule = {name!r} is not supported (expected one of "
                          f"{', '.join(BETA_SCHEDULES.values())})")
    diffusion = {"schedule": schedule, "num_timesteps": config.get("num_train_timesteps", 1000),
                 "zero_terminal_snr": config.get("rescale_betas_zero_snr", False),
                 "prediction_type": config.get("prediction_type", "epsilon"),
                 "beta_range": _own_betas(config, schedule)}
    sampling = {"sampler": SAMPLER_OF_SCHEDULER.get(config.get("_class_name")),
                "steps_offset": config.get("steps_offset", 0),
                **{field: config.get(field) for field in GRID_FIELDS}}
    return diffusion, sampling


def _own_betas(config: dict[str, Any], schedule: str) -> tuple[float, float] | None:
    """(beta_start, beta_end) where they are not our `schedule`'s standard range (SD's x4 upscaler: scaled_linear
    from 1e-4 to 0.02), else None; the cosine schedule has no range."""
    expected = beta_range(schedule)
    got = (float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))  # diffusers' defaults
    if expected is None or all(math.isclose(g, e, rel_tol=1e-6) for g, e in zip(got, expected, strict=True)):
        return None
    return got
