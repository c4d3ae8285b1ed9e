"""The condition encoder protocol, as every registered kind implements it: items, prompts and ∅ in, conditions out;
what training feeds the trained part is what sampling asks for."""

import copy
import dataclasses

import pytest
import torch

from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.registry import CONDITIONERS, build_conditioner, conditioner_type
from latent_diffusion.conditioning.sd3 import SD3Tokenizers
from latent_diffusion.conditioning.sdxl import MicroConditions
from latent_diffusion.conditioning.t5 import T5Tokenizer
from latent_diffusion.conditioning.tokenizer import ClipTokenizer
from latent_diffusion.config import ClipTextConfig, ConditioningConfig, ConfigError
from latent_diffusion.files.weights import CheckpointError

from conftest import randomised
from sd3_fixtures import tiny_t5_tokenizer

TINY_CLIP = ClipTextConfig(width=64, layers=2, heads=4, mlp_width=37)  # an adapter needs 64-wide heads
CASES = {  # one configuration of each registered kind, with a trained part where the kind can have one
    "minilm": ConditioningConfig(encoder="minilm", max_length=32, adapter_layers=1),
    "clip": ConditioningConfig(encoder="clip", clip=TINY_CLIP, adapter_layers=1),
    "class": ConditioningConfig(encoder="class", num_classes=3),
    "sdxl": ConditioningConfig(encoder="sdxl", clip=dataclasses.replace(TINY_CLIP, width=32, heads=2),
                               clip_2=ClipTextConfig(width=32, layers=2, heads=2, mlp_width=40, hidden_act="gelu",
                                                     pad_token_id=0, projection_dim=8)),
    "sd3": ConditioningConfig(encoder="sd3", clip=dataclasses.replace(TINY_CLIP, width=8, heads=2, projection_dim=4,
                                                                      layer="penultimate", final_norm=False),
                              clip_2=ClipTextConfig(width=8, layers=2, heads=2, mlp_width=12, hidden_act="gelu",
                                                    pad_token_id=0, projection_dim=4, layer="penultimate",
                                                    final_norm=False),
                              t5={"vocab_size": 1000, "d_model": 16, "d_kv": 4, "d_ff": 8, "num_layers": 1,
                                  "num_heads": 2, "relative_attention_num_buckets": 8,
                                  "feed_forward_proj": "gated-gelu"}, t5_max_length=8),
}
GEOMETRY = {"size": (32, 32), "original_size": (48, 40), "crop": (2, 3)}  # SDXL's micro-conditioning reads it
ITEMS = [{"caption": "a small red circle in the center", "label": 2, **GEOMETRY},
         {"caption": "a large blue square on the left and a green triangle", "label": 0, **GEOMETRY},
         {"caption": "a triangle", "label": 1, **GEOMETRY}]


@pytest.fixture(scope="module", params=CASES)
def conditioner(request):
    tokenizer = None
    if request.param == "sd3":  # T5's vocabulary comes with a model: a tiny one here
        tokenizer = SD3Tokenizers(ClipTokenizer.from_bpe_file(),
                                  T5Tokenizer(tiny_t5_tokenizer().backend_tokenizer.to_str(), 8))
    conditioner = build_conditioner(CASES[request.param], torch.device("cpu"), context_dim=16, tokenizer=tokenizer)
    torch.manual_seed(0)
    if conditioner.trainable is not None:
        randomised(conditioner.trainable, seed=1)  # a new adapter is the identity: make it do something
    if request.param == "sdxl":  # prompts are asked for at the items' geometry
        conditioner = conditioner.at(MicroConditions(GEOMETRY["original_size"], GEOMETRY["size"], GEOMETRY["crop"]))
    return conditioner


def _rows(cond: Conditioning) -> list[torch.Tensor]:
    """Each sample's real tokens (padding differs with the batch)."""
    return [tokens[mask] for tokens, mask in zip(cond.tokens, cond.mask, strict=True)]


def test_every_registered_kind_is_specified_here():
    assert set(CASES) == set(CONDITIONERS)


def test_training_inputs_through_the_trained_part_are_the_items_conditions_and_null_where_dropped(conditioner):
    drop = torch.tensor([False, True, False])
    inputs = conditioner.training_inputs(ITEMS, drop)
    trained = _rows(conditioner.trainable(inputs) if conditioner.trainable is not None else inputs)
    for i, item in enumerate(ITEMS):
        expected = conditioner.unconditional(1) if drop[i] else conditioner.encode_items([item])
        torch.testing.assert_close(trained[i], _rows(expected)[0], atol=1e-4, rtol=1e-4)  # other batches
        if getattr(inputs, "vector", None) is not None:
            torch.testing.assert_close(inputs.vector[i], expected.vector[0], atol=1e-4, rtol=1e-4)


def test_the_evaluation_prompt_of_a_label_asks_for_the_items_condition(conditioner):
    for item in ITEMS:
        prompt = conditioner.label_prompt(item["label"], item["caption"])
        torch.testing.assert_close(conditioner.encode_prompts([prompt]).tokens,
                                   conditioner.encode_items([item]).tokens, atol=1e-6, rtol=0)


def test_null_condition_repeats_for_the_batch_at_the_encoders_width(conditioner):
    null = conditioner.unconditional(3)
    assert null.batch_size == 3 and null.tokens.shape[-1] == conditioner.dim
    assert torch.equal(null.mask[0], null.mask[2])
    torch.testing.assert_close(null.tokens[0], null.tokens[2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_rows(null)[0].mean(0), _rows(conditioner.encode_items(ITEMS[2:]))[0].mean(0))


def test_with_trainable_samples_with_other_weights_and_leaves_the_trained_module_alone(conditioner):
    if conditioner.trainable is None:
        pytest.skip("nothing of this kind is trained")
    other = randomised(copy.deepcopy(conditioner.trainable), seed=7)
    changed = conditioner.with_trainable(other)
    assert changed.trainable is other and conditioner.trainable is not other
    assert not torch.allclose(changed.encode_prompts(["1"]).tokens, conditioner.encode_prompts(["1"]).tokens)


@pytest.mark.parametrize("name", [name for name, kind in CONDITIONERS.items() if not kind.takes_text_weights])
def test_text_encoder_weights_for_a_kind_that_takes_none_are_an_error(name):
    with pytest.raises(CheckpointError, match=f"text encoder weights given for a '{name}' model"):
        build_conditioner(CASES[name], torch.device("cpu"), 16, text_weights={})


def test_an_unknown_kind_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown condition encoder 'clipp' \(did you mean 'clip'\?\); choose one "
                                          "of minilm, clip, sdxl, sd3, class"):
        conditioner_type("clipp")
