"""Condition encoders τ_θ: y (prompts or class labels) → Conditioning(tokens (B, L, D), mask (B, L)).

`build_encoder("minilm" | "clip" | "class", **kwargs)`; text encoders are frozen, the class embedder is trained.
`bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's BPE vocabulary (MIT), taken from the open_clip_torch 3.3.0 wheel
(MIT); both notices are in `BPE_VOCAB_LICENSE.txt`.
"""

from latent_diffusion.conditioning.base import Conditioning, FrozenEncoder
from latent_diffusion.conditioning.cache import CachedEncoder
from latent_diffusion.conditioning.class_embedder import ClassEmbedder
from latent_diffusion.conditioning.clip import (ClipTextConfig, ClipTextEncoder, ClipTextTransformer,
                                                load_clip_text_state_dict)
from latent_diffusion.conditioning.minilm import MiniLMEncoder
from latent_diffusion.conditioning.registry import ENCODERS, build_encoder
from latent_diffusion.conditioning.tokenizer import ClipTokenizer

__all__ = ["ENCODERS", "CachedEncoder", "ClassEmbedder", "ClipTextConfig", "ClipTextEncoder", "ClipTextTransformer",
           "ClipTokenizer", "Conditioning", "FrozenEncoder", "MiniLMEncoder", "build_encoder",
           "load_clip_text_state_dict"]
