"""Condition encoders τ_θ: y (prompts, captions or class labels) → Conditioning(tokens (B, L, D), mask (B, L)).

`Conditioner` (`conditioner.py`) is the one interface the pipeline and the trainer use; its kinds are registered
by config name in `registry.py` ("minilm" and "clip": frozen text encoders, optionally with a trained adapter;
"class": a trained class embedder) and built with `build_conditioner(cfg, device, ...)`. The networks themselves
(`MiniLMEncoder`, `ClipTextEncoder`, `ClassEmbedder`, `ContextAdapter`) are plain modules.
`bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's BPE vocabulary (MIT), taken from the open_clip_torch 3.3.0 wheel
(MIT); both notices are in `BPE_VOCAB_LICENSE.txt`.
"""

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder
from latent_diffusion.conditioning.cache import CachedEncoder
from latent_diffusion.conditioning.class_embedder import ClassEmbedder
from latent_diffusion.conditioning.classes import ClassConditioner, class_label
from latent_diffusion.conditioning.clip import (ClipTextConfig, ClipTextEncoder, ClipTextTransformer,
                                                load_clip_text_state_dict)
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.dropout import drop_condition, drop_mask
from latent_diffusion.conditioning.minilm import MiniLMEncoder
from latent_diffusion.conditioning.registry import CONDITIONERS, build_conditioner, build_encoder, conditioner_type
from latent_diffusion.conditioning.text import ClipConditioner, MiniLMConditioner, TextConditioner
from latent_diffusion.conditioning.tokenizer import ClipTokenizer

__all__ = ["CONDITIONERS", "CachedEncoder", "ClassConditioner", "ClassEmbedder", "ClipConditioner", "ClipTextConfig",
           "ClipTextEncoder", "ClipTextTransformer", "ClipTokenizer", "Conditioner", "Conditioning", "FrozenEncoder",
           "MiniLMConditioner", "MiniLMEncoder", "TextConditioner", "build_conditioner", "build_encoder",
           "class_label", "conditioner_type", "drop_condition", "drop_mask", "load_clip_text_state_dict"]
