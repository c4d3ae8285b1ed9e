"""LoRA files as people share them, read onto this package's networks, and written for other tools to read.

Formats, told apart by their keys:

- kohya-ss / AUTOMATIC1111 / LyCORIS LoCon: `lora_unet_<layer>` and `lora_te_<layer>` with `.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (a 0-d tensor). <layer> is the layer's module name with "_" for ".": in the
  diffusers UNet (`down_blocks_0_attentions_0_…`, what kohya trains SD 1.x/2.x on) or the original CompVis/SGM
  UNet (`input_blocks_1_1_…`, what kohya trains SDXL on), and in Hugging Face's `CLIPTextModel`
  (`text_model_encoder_layers_0_self_attn_q_proj`). LoCon adapts 3×3 convolutions the same way (down has the
  layer's kernel, up is 1×1). `lora_te1_` / `lora_te2_` are SDXL's two text encoders.
- diffusers / PEFT: `unet.<diffusers layer>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<CLIPTextModel
  layer>.…`, with α per layer from `.alpha` keys ("network alphas") or from the `lora_adapter_metadata` JSON
  that newer diffusers write into the safetensors header (the PEFT `LoraConfig` of each part); also the older
  forms `….lora.down.weight`, `….lora_linear_layer.down.weight` and the attention-processor one
  `unet.….attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`; `q_proj` … in the text encoder).

An underscore name is never split by guessing where its dots were: every adaptable layer of the model is named
the ways a file may name it, and the file's names are looked up there. The scale of each layer's update, as the
tools apply it:

- kohya-ss sd-scripts networks/lora.py `LoRAModule.__init__`: scale = alpha / lora_dim, alpha None or 0 meaning
  alpha = lora_dim, and `forward` adds lora_up(lora_down(x)) · multiplier · scale; `create_network_from_weights`
  takes lora_dim from lora_down's first dimension and alpha = dim where the file has none. AUTOMATIC1111
  extensions-builtin/Lora/network.py `NetworkModule.calc_scale`: alpha / dim, 1.0 without alpha (the same; an
  alpha of 0, which kohya never writes, is kohya's alpha = dim here, a zero update there and in diffusers).
- diffusers loaders/lora_conversion_utils.py `_convert_non_diffusers_lora_to_diffusers` turns kohya's `.alpha`
  into network alphas, which utils/peft_utils.py `get_peft_kwargs` makes PEFT's `lora_alpha` per layer; peft
  tuners/lora/layer.py `update_layer`: scaling = lora_alpha / r (lora_alpha / √r with `use_rslora`). Without
  alphas or metadata, `get_peft_kwargs` sets lora_alpha = r: a scale of 1. (diffusers 0.42 loses the α of a
  kohya file's attention projections whose α is not the file's most common one: its alpha_pattern keys keep the
  converted names `….processor.to_q_lora.down.weight`, which match no layer. This reader applies kohya's α.)
- `lora_adapter_metadata` (diffusers loaders/lora_base.py `LORA_ADAPTER_METADATA_KEY`): {"unet.r", "unet.lora_alpha",
  "unet.alpha_pattern", …} per part; a layer's alpha is the first `alpha_pattern` key matching its name as peft
  utils/other.py `get_pattern_key` matches (regex `(.*\\.)?(key)$`), else `lora_alpha`.

So every layer is (down, up, α) with the update (α/r)·B A, r = down's first dimension (`nn.lora.LowRankWeights`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latent_diffusion.config import UNetConfig
from latent_diffusion.files.weights import CheckpointError, load_pickle, load_weights, read_metadata, save_weights
from latent_diffusion.formats.keymaps import TRANSFORMERS_CLIP_PREFIX, unet_to_diffusers
from latent_diffusion.nn.lora import Adaptable, LowRank, LowRankWeights

UNET, TEXT_ENCODER = "unet", "text_encoder"  # the parts a LoRA adapts, and the key prefixes of `write_lora`
FORMATS = ("kohya", "peft")
KOHYA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# LyCORIS and other adapter kinds this reader does not compute, by a pattern of their keys
UNSUPPORTED_KINDS = {r"\.hada_": "LoHa", r"\.lokr_": "LoKr", r"\.dora_scale$|lora_magnitude_vector": "DoRA",
                     r"\.lora_mid\.": "LoRA with a CP/Tucker middle factor (lora_mid)", r"\.b?oft_": "OFT / BOFT",
                     r"\.diff(_b)?$": "full weight differences (LyCORIS 'full')", r"\.[wb]_norm$": "LyCORIS norm",
                     r"\.on_input$": "(IA)³", r"\.[ab][12]\.weight$": "GLoRA",
                     r"lora_[AB]\.bias$|lora_(up|down)\.bias$": "LoRA with a bias",
                     r"^bundle_emb\.": "textual-inversion embeddings bundled in the LoRA"}
SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_label_emb", "add_embedding")
TRANSFORMER_MARKERS = ("lora_transformer_", "transformer.", "double_blocks", "single_blocks", "joint_blocks",
                       "diffusion_model.")
CONTEXT_FAMILIES = {768: "SD 1.x (768-wide CLIP ViT-L/14 text)", 1024: "SD 2.x (1024-wide OpenCLIP ViT-H/14 text)",
                    2048: "SDXL (2048-wide text from two encoders)"}


class LoRAError(CheckpointError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA read for a model: each adapted layer, by its name in our UNet / CLIP text transformer, with its
    factors and α (`LowRankWeights`)."""

    path: Path
    format: str  # "kohya" or "peft" (diffusers / PEFT, and diffusers' older forms)
    unet: dict[str, LowRankWeights] = field(default_factory=dict)
    text_encoder: dict[str, LowRankWeights] = field(default_factory=dict)


# --- the names a file may give each layer of the model ------------------------------------------------------------

@dataclass
class _Names:
    layers: dict[tuple[str, str], nn.Module] = field(default_factory=dict)  # (part, our name) → layer
    diffusers: dict[str, tuple[str, str]] = field(default_factory=dict)  # "unet.<name>" / "text_encoder.<name>"
    kohya: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # None: two layers share the name
    peft: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)  # names PEFT patterns are matched on

    def add(self, part: str, ours: str, layer: nn.Module, diffusers_names: tuple[str, ...],
            kohya_names: tuple[str, ...]) -> None:
        key = (part, ours)
        self.layers[key] = layer
        self.peft[key] = diffusers_names
        for name in diffusers_names:
            self.diffusers[f"{part}.{name}"] = key
        for name in kohya_names:
            self.kohya[name] = key if self.kohya.get(name, key) == key else None


def _layer_names(unet: nn.Module, unet_config: UNetConfig, text_encoder: nn.Module | None) -> _Names:
    """Every Linear / Conv2d of the UNet and text encoder under each name a LoRA file may give it."""
    names = _Names()
    unet_layers = {name: layer for name, layer in unet.named_modules() if isinstance(layer, Adaptable)}
    theirs = _diffusers_unet_names(unet_config, list(unet_layers))
    for ours, layer in unet_layers.items():
        diffusers = (theirs[ours],) if ours in theirs else ()
        kohya = tuple(KOHYA_PREFIXES[UNET] + name.replace(".", "_") for name in (*diffusers, ours))
        names.add(UNET, ours, layer, diffusers, kohya)
    for ours, layer in (text_encoder.named_modules() if text_encoder is not None else ()):
        if isinstance(layer, Adaptable):
            hf = TRANSFORMERS_CLIP_PREFIX + ours  # CLIPTextModel's name (transformers 5 also drops the prefix)
            names.add(TEXT_ENCODER, ours, layer, (hf, ours), (KOHYA_PREFIXES[TEXT_ENCODER] + hf.replace(".", "_"),))
    return names


def _diffusers_unet_names(cfg: UNetConfig, layers: list[str]) -> dict[str, str]:
    """Our UNet layer name → its `UNet2DConditionModel` name, for the layers diffusers has."""
    try:
        keys = unet_to_diffusers(cfg, [f"{name}.weight" for name in layers])
    except KeyError:  # a layer diffusers does not have (an added key/value stream …): map one by one
        keys = {}
        for name in layers:
            try:
                keys.update(unet_to_diffusers(cfg, [f"{name}.weight"]))
            except KeyError:
                continue
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in keys.items()}


# --- reading -----------------------------------------------------------------------------------------------------

def read_lora(path: str | os.PathLike, unet: nn.Module, unet_config: UNetConfig,
              text_encoder: nn.Module | None = None, encoder: str = "clip") -> LoRAFile:
    """The LoRA file at `path` (.safetensors; .pt/.bin/.ckpt read with weights_only) as factors for the layers
    of `unet` (built from `unet_config`) and `text_encoder` (a CLIP text transformer; None when the model has
    none, `encoder` naming what it has instead). Every key must find its layer and fit its shape: a LoRAError
    names the keys that do not and the likely cause."""
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    _refuse_other_models(path, tensors)
    _refuse_kinds(path, tensors)
    kohya = all(key.startswith("lora_") for key in tensors)
    if text_encoder is None:
        te_keys = [k for k in tensors if k.startswith((KOHYA_PREFIXES[TEXT_ENCODER], f"{TEXT_ENCODER}."))]
        if te_keys:
            raise LoRAError(f"LoRA {path}: {len(te_keys)} keys adapt a CLIP text encoder (e.g. {te_keys[:3]}), and "
                            f"this model's text encoder is {encoder!r}, not CLIP: use a LoRA of the UNet only")
    names = _layer_names(unet, unet_config, text_encoder)
    found = _kohya_factors(tensors, names) if kohya else _diffusers_factors(path, tensors, metadata, names)
    unknown = [key for key, target in found.items() if target is None]
    if unknown:
        raise LoRAError(f"LoRA {path}: {len(unknown)} of its {len(tensors)} keys name no layer of this model "
                        f"(e.g. {unknown[:4]}); {_context_cause(tensors, unet_config) or _unknown_cause(unknown)}")
    layers = _assemble(path, tensors, {k: v for k, v in found.items() if v is not None})
    _check_shapes(path, layers, names, _context_cause(tensors, unet_config))
    out = LoRAFile(path, "kohya" if kohya else "peft")
    for (part, ours), (weights, _) in layers.items():
        getattr(out, part)[ours] = weights
    return out


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (and safetensors metadata) of a LoRA file."""
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = load_weights(path), read_metadata(path)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = load_pickle(path), {}
        if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
            tensors = tensors["state_dict"]
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise LoRAError(f"LoRA {path}: expected a dictionary of named tensors, got {type(tensors).__name__}")
    else:
        raise LoRAError(f"LoRA {path}: expected a .safetensors file (or {', '.join(PICKLE_SUFFIXES)})")
    if not tensors:
        raise LoRAError(f"LoRA {path} holds no tensors")
    return tensors, metadata


def _refuse_other_models(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    sdxl = [k for k in tensors if any(marker in k for marker in SDXL_MARKERS)]
    if sdxl:
        raise LoRAError(f"LoRA {path}: this LoRA is for SDXL (two text encoders, added embeddings: e.g. {sdxl[:3]}); "
                        "this model is not SDXL")


def _refuse_kinds(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    kinds: dict[str, list[str]] = {}
    for key in tensors:
        kind = next((name for pattern, name in UNSUPPORTED_KINDS.items() if re.search(pattern, key)), None)
        if kind is not None:
            kinds.setdefault(kind, []).append(key)
    if kinds:
        described = "; ".join(f"{kind} (e.g. {keys[:2]})" for kind, keys in kinds.items())
        raise LoRAError(f"LoRA {path}: holds adapter kinds this package does not apply: {described}. Supported: "
                        "LoRA and LoCon (lora_down/lora_up, lora_A/lora_B)")


_CROSS_ATTENTION_KEY = re.compile(r"attn2[._](?:processor\.)?to_k(?:_lora)?[._](?:lora_down|lora_A|lora\.down|down)"
                                 r"\.weight$")


def _context_cause(tensors: Mapping[str, torch.Tensor], cfg: UNetConfig) -> str | None:
    """"a LoRA for SD 2.x …" when the file's cross-attention keys read text context of another width than the
    model's (the width of `attn2.to_k`'s down factor), else None."""
    widths = {t.shape[1] for key, t in tensors.items() if _CROSS_ATTENTION_KEY.search(key) and t.ndim == 2}
    other = sorted(w for w in widths if w != cfg.context_dim)
    if not other or cfg.context_dim is None:
        return None
    return (f"its cross-attention reads {other[0]}-wide text context where this model's reads {cfg.context_dim}: a "
            f"LoRA for {CONTEXT_FAMILIES.get(other[0], f'a model with {other[0]}-wide text')}, this model is "
            f"{CONTEXT_FAMILIES.get(cfg.context_dim, f'one with {cfg.context_dim}-wide text')}")


def _unknown_cause(keys: list[str]) -> str:
    if any(marker in key for key in keys for marker in TRANSFORMER_MARKERS):
        return "a LoRA for a transformer backbone (Flux, SD3, …), not for a UNet"
    return ("a LoRA for another model architecture (or for layers this model lacks), or keys in a naming this "
            "reader does not know")


# --- kohya / A1111 ----------------------------------------------------------------------------------------------

_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
                # AUTOMATIC1111 network_lora.py ModuleTypeLora also takes PEFT's factor names under kohya's
                "lora_A.weight": "down", "lora_B.weight": "up"}


def _kohya_factors(tensors: Mapping[str, torch.Tensor], names: _Names) -> dict[str, tuple | None]:
    """key → ((part, our layer), role) for each key of a kohya file, None for keys naming no layer."""
    found = {}
    for key in tensors:
        lora_name, _, suffix = key.partition(".")
        target, role = names.kohya.get(lora_name), _KOHYA_ROLES.get(suffix)
        found[key] = (target, role) if target is not None and role is not None else None
    return found


# --- diffusers / PEFT --------------------------------------------------------------------------------------------

_DIFFUSERS_FACTOR = re.compile(r"^(?P<layer>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora(?:_linear_layer)?\.(?P<du>down|up)"
                               r"\.weight)$")
_PROCESSOR_FACTOR = re.compile(r"^(?P<block>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                               r"(?P<du>down|up)\.weight$")
# the attention processor's projection → the layer, in the UNet and in CLIPTextModel (diffusers
# utils/state_dict_utils.py UNET_TO_DIFFUSERS and DIFFUSERS_OLD_TO_PEFT)
_PROCESSOR_LAYERS = {UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     TEXT_ENCODER: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


def _diffusers_factors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                       names: _Names) -> dict[str, tuple | None]:
    """key → ((part, our layer), role) for each key of a diffusers / PEFT file (None: names no layer); the α of
    layers without an `.alpha` key from the `lora_adapter_metadata`, as (target, ("alpha", α)) entries keyed
    "<metadata:…>"."""
    found: dict[str, tuple | None] = {}
    for key in tensors:
        part, rest = (TEXT_ENCODER, key[len(TEXT_ENCODER) + 1:]) if key.startswith(f"{TEXT_ENCODER}.") else \
            (UNET, key.removeprefix(f"{UNET}."))  # diffusers' `save_attn_procs` files have no prefix
        layer, role = _diffusers_layer(part, rest)
        target = names.diffusers.get(f"{part}.{layer}") if layer else None
        found[key] = (target, role) if target is not None else None
    ranks = {entry[0]: tensors[key].shape[0] for key, entry in found.items() if entry and entry[1] == "down"}
    for target, alpha in _metadata_alphas(path, metadata, ranks, names).items():
        found[f"<metadata:{target[0]}.{target[1]}>"] = (target, ("alpha", alpha))
    return found


def _diffusers_layer(part: str, rest: str) -> tuple[str | None, str | None]:
    """(layer name, role) of a diffusers / PEFT key after its part's prefix."""
    if match := _DIFFUSERS_FACTOR.match(rest):
        role = {"A": "down", "B": "up"}.get(match["ab"] or "", match["du"])
        return match["layer"], role
    if match := _PROCESSOR_FACTOR.match(rest):
        return f"{match['block']}.{_PROCESSOR_LAYERS[part][match['proj']]}", match["du"]
    if rest.endswith(".alpha"):  # network alphas, kohya's meaning (diffusers `network_alphas`)
        return rest.removesuffix(".alpha"), "alpha"
    return None, None


def _metadata_alphas(path: Path, metadata: Mapping[str, str], ranks: Mapping[tuple[str, str], int],
                     names: _Names) -> dict[tuple[str, str], float]:
    """The α of each adapted layer (with its rank in `ranks`) from the `lora_adapter_metadata` PEFT configs, as
    kohya's α: the update's scale is α/r (empty without the metadata)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoRAError(f"LoRA {path}: {METADATA_KEY} in its header is not JSON ({exc})") from exc
    alphas = {}
    for layer, rank in ranks.items():
        part = layer[0]
        peft = {k[len(part) + 1:]: v for k, v in config.items() if k.startswith(f"{part}.")}
        if not peft:
            continue
        if peft.get("use_dora"):
            raise LoRAError(f"LoRA {path}: its {METADATA_KEY} makes the {part} a DoRA adapter (use_dora), which this "
                            "package does not apply")
        alpha = peft.get("lora_alpha", peft.get("r"))
        for pattern, value in (peft.get("alpha_pattern") or {}).items():
            if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names.peft[layer]):
                alpha = value
                break
        if alpha is not None:  # peft `use_rslora`: a scale of α/√r, which is (α·√r)/r
            alphas[layer] = float(alpha) * (math.sqrt(rank) if peft.get("use_rslora") else 1.0)
    return alphas


# --- factors → layers, checked -----------------------------------------------------------------------------------

def _assemble(path: Path, tensors: Mapping[str, torch.Tensor], found: Mapping[str, tuple]
              ) -> dict[tuple[str, str], tuple[LowRankWeights, str]]:
    """(part, our layer) → (its factors and α, the file's key of its down factor)."""
    parts: dict[tuple[str, str], dict] = {}
    for key, (target, role) in found.items():
        entry = parts.setdefault(target, {})
        if isinstance(role, tuple):  # an α from the metadata: `.alpha` keys come first
            entry.setdefault("alpha", role[1])
            continue
        if role in entry and role != "alpha":
            raise LoRAError(f"LoRA {path}: two keys give the {role} factor of one layer ({entry['keys'][role]!r} and "
                            f"{key!r})")
        entry[role] = float(tensors[key].float().item()) if role == "alpha" else tensors[key]
        entry.setdefault("keys", {})[role] = key
    layers, incomplete = {}, []
    for target, entry in parts.items():
        keys = entry.get("keys", {})
        if "down" not in entry or "up" not in entry:
            incomplete.append(next(iter(keys.values()), f"{target[0]}.{target[1]}"))
            continue
        alpha = entry.get("alpha")
        # kohya networks/lora.py LoRAModule: `alpha = self.lora_dim if alpha is None or alpha == 0`
        layers[target] = (LowRankWeights(entry["down"], entry["up"], alpha or None), keys["down"])
    if incomplete:
        raise LoRAError(f"LoRA {path}: {len(incomplete)} layers lack their down or up factor (e.g. {incomplete[:3]})")
    return layers


def _check_shapes(path: Path, layers: Mapping[tuple[str, str], tuple[LowRankWeights, str]], names: _Names,
                  cause: str | None) -> None:
    wrong = [f"{key}: {problem}" for target, (weights, key) in layers.items()
             if (problem := LowRank.mismatch(names.layers[target], weights))]
    if wrong:
        raise LoRAError(f"LoRA {path}: {len(wrong)} layers do not fit this model's shapes (e.g. {wrong[:3]}); "
                        f"{cause or 'a LoRA for another model (other layer widths)'}")


# --- writing -----------------------------------------------------------------------------------------------------

def write_lora(path: str | os.PathLike, layers: Mapping[str, LowRank | LowRankWeights], unet_config: UNetConfig,
               fmt: str = "kohya", metadata: Mapping[str, str] | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Write a LoRA file atomically, for AUTOMATIC1111 / ComfyUI / kohya (`fmt="kohya"`) or diffusers / PEFT
    (`fmt="peft"`, with the `lora_adapter_metadata` from which diffusers reads each layer's α).

    :param layers: "unet.<our UNet layer>" or "text_encoder.<our CLIP layer>" (as `LoRA.by_layer()` names them,
        with the part in front) → the layer's `LowRank` (a trained adapter) or `LowRankWeights` (down, up, α).
    :param unet_config: the adapted UNet's config (the diffusers names of its layers depend on it).
    :param metadata: extra safetensors metadata (strings), e.g. kohya's `ss_*` training facts.
    :param dtype: the dtype of the stored factors (None: as they are; kohya commonly saves fp16)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt = {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not layers:
        raise ValueError("write_lora: no layers to write")
    by_part = _split_parts(layers)
    theirs = _diffusers_unet_names(unet_config, list(by_part.get(UNET, {})))
    missing = [name for name in by_part.get(UNET, {}) if name not in theirs]
    if missing:
        raise ValueError(f"write_lora: UNet layers with no diffusers name: {missing[:4]}")
    names = {UNET: theirs, TEXT_ENCODER: {ours: TRANSFORMERS_CLIP_PREFIX + ours for ours in by_part.get(TEXT_ENCODER,
                                                                                                        {})}}
    tensors: dict[str, torch.Tensor] = {}
    peft_configs: dict[str, object] = {}
    for part, part_layers in by_part.items():
        for ours, weights in part_layers.items():
            down, up = (t.detach().to("cpu", dtype or t.dtype).contiguous() for t in weights[:2])
            alpha = weights.alpha if weights.alpha is not None else down.shape[0]
            if fmt == "kohya":
                name = KOHYA_PREFIXES[part] + names[part][ours].replace(".", "_")
                tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                f"{name}.alpha": torch.tensor(float(alpha), dtype=dtype or torch.float32)})
            else:
                name = f"{part}.{names[part][ours]}"
                tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
        peft_configs.update(_peft_config(part, part_layers, names[part]))
    header = {"format": "pt", **(metadata or {})}
    if fmt == "peft":
        header[METADATA_KEY] = json.dumps(peft_configs, sort_keys=True)
    save_weights(tensors, path, header)


def _split_parts(layers: Mapping[str, LowRank | LowRankWeights]) -> dict[str, dict[str, LowRankWeights]]:
    """{"unet": {our layer: weights}, "text_encoder": {…}} from `write_lora`'s prefixed names."""
    by_part: dict[str, dict[str, LowRankWeights]] = {}
    for name, value in layers.items():
        part, _, ours = name.partition(".")
        if part not in (UNET, TEXT_ENCODER) or not ours:
            raise ValueError(f"write_lora: layer name {name!r} must start with 'unet.' or 'text_encoder.'")
        weights = value.weights() if isinstance(value, LowRank) else LowRankWeights(*value)
        by_part.setdefault(part, {})[ours] = weights
    return by_part


def _peft_config(part: str, layers: Mapping[str, LowRankWeights], names: Mapping[str, str]) -> dict[str, object]:
    """The PEFT `LoraConfig` fields of one part, prefixed as diffusers' `save_lora_weights` writes them: the most
    common rank and α, and patterns for the layers that differ (names without CLIPTextModel's `text_model.`,
    which transformers 5 leaves out, matched as suffixes: the same layers in transformers 4 and 5)."""
    modules = {ours: names[ours].removeprefix(TRANSFORMERS_CLIP_PREFIX) if part == TEXT_ENCODER else names[ours]
               for ours in layers}
    ranks = {ours: w.down.shape[0] for ours, w in layers.items()}
    alphas = {ours: float(w.alpha if w.alpha is not None else w.down.shape[0]) for ours, w in layers.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules.values()),
              "rank_pattern": {modules[o]: r for o, r in ranks.items() if r != rank},
              "alpha_pattern": {modules[o]: a for o, a in alphas.items() if a != alpha},
              "use_dora": False, "use_rslora": False, "lora_bias": False}
    return {f"{part}.{key}": value for key, value in config.items()}
