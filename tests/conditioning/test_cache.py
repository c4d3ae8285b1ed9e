"""The text-condition cache returns what its encoder returns and encodes each prompt once."""

import torch

from latent_diffusion.conditioning import CachedEncoder


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
