"""The CLIP text transformer against transformers' (last and penultimate layer, pooled output), its weight loader's key
rules, and the frozen encoder read out of an SD 1.x checkpoint."""

import pytest
import torch

from latent_diffusion.conditioning import (ClipTextConfig, ClipTextEncoder, ClipTextTransformer,
                                           load_clip_text_state_dict)
from latent_diffusion.files.weights import CheckpointError, save_weights

TINY_CLIP = {"width": 32, "layers": 2, "heads": 4, "mlp_width": 37}


def hf_tiny_clip():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    torch.manual_seed(0)
    return transformers.CLIPTextModel(config).eval()


def test_clip_text_transformer_matches_transformers(clip_tokenizer):
    hf = hf_tiny_clip()
    ids = clip_tokenizer(["a photo of a cat", "", "an astronaut riding a horse on mars, 4k"])
    ours = {layer: ClipTextTransformer(ClipTextConfig(**TINY_CLIP, layer=layer)).eval()
            for layer in ("last", "penultimate")}
    for model in ours.values():
        load_clip_text_state_dict(model, hf.state_dict())
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True)
        last, pooled = ours["last"](ids, return_pooled=True)
        penultimate = ours["penultimate"](ids)
        expected_penultimate = hf.final_layer_norm(expected.hidden_states[-2])
    assert last.shape == (3, 77, 32) and pooled.shape == (3, 32)
    assert (last - expected.last_hidden_state).abs().max() <= 1e-5
    assert (pooled - expected.pooler_output).abs().max() <= 1e-5
    assert (penultimate - expected_penultimate).abs().max() <= 1e-5


def test_clip_loader_accepts_text_model_prefix_and_legacy_position_ids():
    weights = ClipTextTransformer(ClipTextConfig(**TINY_CLIP)).state_dict()
    legacy = {f"text_model.{k}": v for k, v in weights.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    model = ClipTextTransformer(ClipTextConfig(**TINY_CLIP))
    load_clip_text_state_dict(model, legacy)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_clip_loader_names_missing_and_unexpected_keys():
    weights = ClipTextTransformer(ClipTextConfig(**TINY_CLIP)).state_dict()
    del weights["final_layer_norm.weight"]
    weights["text_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(37, 32)
    with pytest.raises(CheckpointError, match=r"missing keys.*final_layer_norm\.weight.*unexpected keys.*layers\.2"):
        load_clip_text_state_dict(ClipTextTransformer(ClipTextConfig(**TINY_CLIP)), weights)


def test_clip_text_encoder_loads_the_text_encoder_out_of_an_sd1_checkpoint(tmp_path, clip_tokenizer):
    source = ClipTextTransformer(ClipTextConfig(**TINY_CLIP)).eval()
    checkpoint = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in source.state_dict().items()}
    checkpoint["model.diffusion_model.out.0.weight"] = torch.ones(4)
    save_weights(checkpoint, tmp_path / "sd1.safetensors")
    encoder = ClipTextEncoder(TINY_CLIP, weights=tmp_path / "sd1.safetensors", tokenizer=clip_tokenizer)
    encoder.train()
    cond = encoder(["a red cube", "a blue ball"])
    assert cond.tokens.shape == (2, 77, 32) and cond.mask.all() and encoder.dim == 32
    assert not encoder.training and not cond.tokens.requires_grad
    with torch.no_grad():
        assert torch.equal(cond.tokens, source(clip_tokenizer(["a red cube", "a blue ball"])))
