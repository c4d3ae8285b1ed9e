"""A tiny random-weight Stable Diffusion 3 pipeline built offline with diffusers and saved as a diffusers folder."""

from __future__ import annotations

import json
import pathlib
import string
import tempfile

import torch

SD3_PROMPTS = ["a red square on a blue circle", "an astronaut riding a horse"]

_T5_WORDS = ("a an the of on in with and to at by for from is are it this that as or not no be has have photo "
             "picture image painting drawing portrait close up view top side front back left right small large big "
             "tiny old new young red blue green yellow black white orange purple pink brown gray grey dark light "
             "bright square circle triangle shape line color colour man woman person people child dog cat horse bird "
             "tree house car street city sky sea water sun moon star night day space astronaut riding rides sitting "
             "standing walking running holding wearing under over above below near blurry sharp detailed high quality "
             "low beautiful ugly style art")


def _clip_tokenizer(folder: pathlib.Path, pad_token: str):
    """transformers' CLIPTokenizer for the project's bundled CLIP vocabulary, padding with `pad_token`."""
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    assert tokenizer.model_max_length == 77
    return tokenizer


def tiny_t5_tokenizer():
    """A T5TokenizerFast over a few hundred Unigram pieces (whole words, letters, digits), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    symbols = string.ascii_letters + string.digits + ".,:;!?'\"()-"
    words = dict.fromkeys(_T5_WORDS.split() + " ".join(SD3_PROMPTS).split())
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -3.0}  # T5's ids 0, 1, 2; then log-prob-like scores
    scores |= {f"▁{w}": -5.0 - i / 100 for i, w in enumerate(words)}
    scores |= {f"▁{c}": -9.0 for c in symbols if f"▁{c}" not in scores} | {c: -10.0 for c in symbols}
    tok = Tokenizer(models.Unigram(list(scores.items()), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def tiny_sd3_diffusers(folder, seed=0, qk_norm=None, dual_attention_layers=(), with_t5=True) -> pathlib.Path:
    """Build (seeded) and save a tiny diffusers StableDiffusion3Pipeline in `folder`; returns the folder."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from latent_diffusion.conditioning.tokenizer import ClipTokenizer

    folder = pathlib.Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80, out_channels=16,
        pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers))
    with torch.no_grad():  # noise on every parameter: diffusers zero-initialises adaLN and proj_out
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=16,
        norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035)
    clip = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406,
                eos_token_id=49407, pad_token_id=1, num_attention_heads=4)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, projection_dim=32, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=48, intermediate_size=50, num_hidden_layers=3, projection_dim=48, **clip))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=1000, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)).eval() if with_t5 else None
    with tempfile.TemporaryDirectory() as tmp:
        ClipTokenizer.from_bpe_file().save_folder(tmp)
        tokenizer = _clip_tokenizer(pathlib.Path(tmp), "<|endoftext|>")
        tokenizer_2 = _clip_tokenizer(pathlib.Path(tmp), "!")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer() if with_t5 else None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_tiny_sd3_diffusers(folder):
    """diffusers' StableDiffusion3Pipeline from `folder`; diffusers wants text_encoder_3/tokenizer_3=None without T5."""
    from diffusers import StableDiffusion3Pipeline
    index = json.loads((pathlib.Path(folder) / "model_index.json").read_text())
    no_t5 = {name: None for name in ("text_encoder_3", "tokenizer_3") if index.get(name, [None])[0] is None}
    return StableDiffusion3Pipeline.from_pretrained(folder, **no_t5)
