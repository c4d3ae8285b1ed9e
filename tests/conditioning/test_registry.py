"""A new kind of condition encoder is one `Conditioner` subclass registered in one place: the pipeline samples
with it and the trainer trains its trained part, neither asking which kind it is."""

from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
from torch import nn

from latent_diffusion.conditioning import build_encoder
from latent_diffusion.conditioning.base import Conditioning
from latent_diffusion.conditioning.conditioner import Conditioner
from latent_diffusion.conditioning.registry import CONDITIONERS, build_conditioner
from latent_diffusion.config import ConditioningConfig, ConfigError
from latent_diffusion.files.weights import CheckpointError, load_weights
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

from conftest import randomised, tiny_ldm_config, tiny_model_parts


class ByteEmbedder(nn.Module):
    """Byte ids (B, L) → Conditioning: a learned token per byte value; id 0 pads."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.table = nn.Embedding(256, dim)

    def forward(self, ids: torch.Tensor) -> Conditioning:
        ids = ids.to(self.table.weight.device)
        return Conditioning(self.table(ids) * (ids > 0)[..., None], ids > 0)


class ByteConditioner(Conditioner):
    """Each UTF-8 byte of a caption is a token of a table trained with the UNet; ∅ is the empty caption."""

    network = ByteEmbedder
    trained_part = "byte embedder"
    built: list[tuple["ByteConditioner", torch.Tensor]] = []  # each one built, with its initial table (a spy)

    def __init__(self, cfg: ConditioningConfig, embedder: ByteEmbedder):
        self.cfg, self.encoder, self.dim = cfg, embedder, embedder.dim

    @classmethod
    def build(cls, cfg, device, context_dim=None, text_weights=None, dtype=torch.float32, tokenizer=None):
        conditioner = cls(cfg, ByteEmbedder(context_dim).to(device))
        cls.built.append((conditioner, conditioner.encoder.table.weight.detach().clone()))
        return conditioner

    @property
    def trainable(self) -> ByteEmbedder:
        return self.encoder

    def with_trainable(self, module: ByteEmbedder) -> "ByteConditioner":
        return ByteConditioner(self.cfg, module)

    @staticmethod
    def ids(texts: Sequence[str]) -> torch.Tensor:
        rows = [list(text.encode())[:16] or [32] for text in texts]  # ∅ (the empty caption) is one space
        return torch.tensor([row + [0] * (max(map(len, rows)) - len(row)) for row in rows])

    def encode_items(self, items):
        return self.encoder(self.ids([item["caption"] for item in items]))

    def encode_prompts(self, prompts):
        return self.encoder(self.ids(prompts))

    def unconditional(self, batch_size):
        return self.encoder(self.ids([""] * batch_size))

    def training_inputs(self, items, drop):
        return self.ids(["" if d else item["caption"] for item, d in zip(items, drop.tolist(), strict=True)])

    def label_prompt(self, label, caption):
        return caption


@pytest.fixture
def registered(monkeypatch):
    """ByteConditioner registered as "bytes" for the length of a test."""
    monkeypatch.setitem(CONDITIONERS, "bytes", ByteConditioner)
    return ConditioningConfig(encoder="bytes")


def test_a_registered_kind_is_built_by_its_config_name(registered):
    conditioner = build_conditioner(registered, torch.device("cpu"), context_dim=8)
    assert isinstance(conditioner, ByteConditioner) and conditioner.dim == 8


def test_the_pipeline_loads_its_trained_part_and_samples_with_it(registered):
    parts = tiny_model_parts(registered, randomised(ByteEmbedder(8), 3).state_dict(), steps=2)
    pipe = Pipeline.from_parts(parts, device="cpu")
    assert torch.equal(pipe.conditioner.trainable.table.weight, parts.conditioner["table.weight"])
    red, blue = (pipe.generate_tensors(prompt, seed=0, progress=False) for prompt in ("red", "blue"))
    assert red.shape == (1, 3, 32, 32) and (red - blue).abs().max() > 1e-3  # the condition reaches the UNet
    parts.conditioner = None
    with pytest.raises(CheckpointError, match=r"needs the weights of its byte embedder \(conditioner.safetensors\)"):
        Pipeline.from_parts(parts, device="cpu")


def test_the_trainer_trains_its_trained_part(registered, autoencoder_run, shapes_folder, tmp_path):
    # 3 steps: the UNet's zero-initialised output layers pass no gradient to the condition before the third
    cfg = tiny_ldm_config(autoencoder_run, max_steps=3, ema_decay=None, checkpoint_every=3, weight_decay=0.0)
    cfg = replace(cfg, conditioning=registered, unet=replace(cfg.unet, context_dim=8))
    ByteConditioner.built.clear()
    train_ldm(cfg, shapes_folder, tmp_path, device="cpu", progress=False)
    (conditioner, initial), = ByteConditioner.built
    trained = load_weights(tmp_path / "conditioner.safetensors")["table.weight"]
    assert torch.equal(trained, conditioner.trainable.table.weight.detach())  # the module the optimiser trained
    changed = (trained != initial).any(dim=1)
    assert changed[ord("a")] and not changed[128:].any()  # through the captions' bytes (no caption is non-ASCII)
    assert (tmp_path / "samples" / "samples_0000003.png").is_file()  # sampled with it


def test_registry_rejects_unknown_names_and_parameters():
    with pytest.raises(ConfigError, match="did you mean 'clip'"):
        build_encoder("clipp")
    with pytest.raises(ConfigError, match="num_clases"):
        build_encoder("class", num_clases=10, dim=8)
