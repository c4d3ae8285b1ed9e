"""The trained text adapter on frozen text tokens: identity at first, mixing only real tokens, trained with the UNet,
resumed, and the source of a fine-tuned model (`training.init_from`)."""

import json
from dataclasses import replace

import pytest
import torch

from latent_diffusion.conditioning.adapter import ContextAdapter
from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.config import ConditioningConfig, ConfigError
from latent_diffusion.files.weights import load_weights
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

from conftest import randomised, tiny_ldm_config


def _condition(batch=2, length=6, dim=64, real=(6, 3)):
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]
    tokens = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(0)) * mask[..., None]
    return Conditioning(tokens, mask)


def test_a_new_adapter_is_the_identity():
    cond = _condition()
    out = ContextAdapter(64, layers=2)(cond)
    torch.testing.assert_close(out.tokens, cond.tokens)
    assert torch.equal(out.mask, cond.mask)


def test_adapter_mixes_real_tokens_and_ignores_padding():
    adapter = randomised(ContextAdapter(64, layers=1), 1)
    cond = _condition()
    out = adapter(cond).tokens
    assert out[1, 3:].abs().max() == 0  # padding stays zero
    padded = cond.tokens.clone()
    padded[1, 3:] = 5.0  # what sits under the padding must not matter
    torch.testing.assert_close(adapter(Conditioning(padded, cond.mask)).tokens, out)
    changed = cond.tokens.clone()
    changed[1, 0] = -changed[1, 0]  # another real token does: the adapter is not per-token
    assert (adapter(Conditioning(changed, cond.mask)).tokens[1, 2] - out[1, 2]).abs().max() > 1e-4


def test_adapter_settings_are_checked():
    with pytest.raises(ConfigError, match="conditioning.adapter_layers"):
        ConditioningConfig(encoder="class", num_classes=3, adapter_layers=1)
    with pytest.raises(ConfigError, match="conditioning.adapter_layers"):
        ConditioningConfig(adapter_layers=-1)
    with pytest.raises(ValueError, match="head_dim"):
        ContextAdapter(100, layers=1)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, shapes_folder, autoencoder_run):
    cfg = tiny_ldm_config(autoencoder_run, max_steps=10, checkpoint_every=5)
    cfg = replace(cfg, conditioning=replace(cfg.conditioning, adapter_layers=1))
    run = tmp_path_factory.mktemp("adapter")
    train_ldm(cfg, shapes_folder, run, device="cpu", progress=False)
    return cfg, run


def test_adapter_trains_with_the_unet_and_loads(adapter_run):
    cfg, run = adapter_run
    weights = load_weights(run / "conditioner.safetensors")
    assert weights["layers.0.attn.to_out.0.weight"].abs().max() > 0  # it learned (it starts at zero)
    pipe = Pipeline.from_pretrained(run, device="cpu")
    torch.testing.assert_close(pipe.conditioner.adapter.state_dict()["layers.0.ff.net.2.weight"],
                               weights["layers.0.ff.net.2.weight"])
    first = pipe.generate_tensors("a small red circle in the center", steps=3, seed=4, progress=False)
    torch.testing.assert_close(pipe.generate_tensors("a small red circle in the center", steps=3, seed=4,
                                                     progress=False), first)
    with torch.no_grad():  # the adapter is used: without it the image changes
        for layer in pipe.conditioner.adapter.layers:
            layer.attn.to_out[0].weight.zero_()
            layer.ff.net[2].weight.zero_()
    assert (pipe.generate_tensors("a small red circle in the center", steps=3, seed=4, progress=False)
            - first).abs().max() > 1e-4


def test_adapter_run_resumes_and_stays_native(adapter_run, shapes_folder, tmp_path):
    cfg, run = adapter_run
    train_ldm(replace(cfg, training=replace(cfg.training, max_steps=15)), shapes_folder, run, device="cpu",
              progress=False)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 5, 10, 15]
    with pytest.raises(ConfigError, match="adapter"):
        save_model(load_model(run), tmp_path / "model.safetensors", "original")


def test_init_from_starts_at_the_source_weights(adapter_run, shapes_folder, autoencoder_run, tmp_path):
    _, source = adapter_run
    cfg = tiny_ldm_config(autoencoder_run, max_steps=1, learning_rate=0.0, weight_decay=0.0,
                          init_from=str(source))
    cfg = replace(cfg, conditioning=replace(cfg.conditioning, adapter_layers=1))
    train_ldm(cfg, shapes_folder, tmp_path / "tuned", device="cpu", progress=False)
    for name in ("unet.safetensors", "conditioner.safetensors"):  # lr 0: still the source's weights
        want, got = load_weights(source / name), load_weights(tmp_path / "tuned" / name)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"{name}: {key}")
    missing = replace(cfg, training=replace(cfg.training, init_from=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="training.init_from"):
        train_ldm(missing, shapes_folder, tmp_path / "other", device="cpu", progress=False)
