"""`ldm train-lora` / `train-embedding`: the model frozen, the adapter trained, resumed, and written in the files
AUTOMATIC1111 and diffusers read (diffusers loads what we wrote and computes what we compute)."""

import dataclasses
import json
import shutil

import pytest
import torch

from latent_diffusion.config import ConfigError, TrainConfig
from latent_diffusion.formats.embeddings import read_embedding
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.adapter_config import AdapterRunConfig, EmbeddingSettings, LoRASettings
from latent_diffusion.training.adapters import train_adapter
from latent_diffusion.training.personal import unet_lora_layers
from latent_diffusion.unet import UNetModel

from conftest import TINY_SD1, tiny_original_parts

TOKEN = "<blob>"


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """A tiny SD 1.x-structured model as a single checkpoint file (32×32 images)."""
    path = tmp_path_factory.mktemp("sd") / "tiny-sd.safetensors"
    save_model(tiny_original_parts(TINY_SD1, resolution=32), path, "original")
    return path


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory, shapes_folder):
    """Eight shape images whose captions name a new word."""
    folder = tmp_path_factory.mktemp("token")
    for image in sorted(shapes_folder.glob("*.png"))[:8]:
        shutil.copy(image, folder / image.name)
        (folder / image.with_suffix(".txt").name).write_text(f"a {TOKEN} on a plain background")
    return folder


def _config(model, kind="lora", steps=3, **settings) -> AdapterRunConfig:
    training = TrainConfig(batch_size=2, learning_rate=3e-2, adam_betas=(0.9, 0.999), max_steps=steps, log_every=1,
                           image_every=100, checkpoint_every=100)
    adapter = {"lora": LoRASettings(rank=2, alpha=1.0, **settings)} if kind == "lora" else \
        {"embedding": EmbeddingSettings(**settings)}
    return AdapterRunConfig(model=str(model), kind=kind, resolution=32, prompts=("a red circle",), sample_steps=2,
                            training=training, **adapter)


def _unet_output(pipe_unet, cfg, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        return pipe_unet(x, torch.tensor([10, 500]), context)


@pytest.mark.parametrize("fmt, text_encoder", [("kohya", False), ("peft", True)])
def test_trained_lora_loads_in_diffusers_and_ours_to_the_same_outputs(sd_file, shapes_folder, tmp_path, fmt,
                                                                      text_encoder):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    last = train_adapter(_config(sd_file, format=fmt, text_encoder=text_encoder), shapes_folder, tmp_path / "run",
                         device="cpu", progress=False)
    assert last["step"] == 3 and all(json.loads(line)["loss"] > 0 for line in
                                     (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "loss" in line)
    file = tmp_path / "run" / {"kohya": "lora.safetensors", "peft": "pytorch_lora_weights.safetensors"}[fmt]
    ours = Pipeline.from_pretrained(sd_file, device="cpu")
    plain = _unet_output(ours.unet, ours.config.unet)
    ours.load_lora(file)
    adapted = _unet_output(ours.unet, ours.config.unet)
    assert (adapted - plain).abs().max() > 1e-4  # training moved the adapters off zero

    save_model(load_model(sd_file), tmp_path / "diffusers", "diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", safety_checker=None,
                                                               requires_safety_checker=False)
    theirs.load_lora_weights(str(file))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, ours.config.unet.context_dim, generator=g)
    with torch.no_grad():
        reference = theirs.unet(x, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=1e-5)
    if text_encoder:
        ids = torch.tensor([ours.conditioner.encoder.tokenizer(["a red circle"])[0].tolist()])
        with torch.no_grad():
            mine = ours.conditioner.encoder(["a red circle"]).tokens
            torch.testing.assert_close(mine, theirs.text_encoder(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_a_resumed_run_trains_the_same_lora_as_one_straight_run(sd_file, shapes_folder, tmp_path):
    from latent_diffusion.files.weights import load_weights
    train_adapter(_config(sd_file, steps=4), shapes_folder, tmp_path / "straight", device="cpu", progress=False)
    cut = dataclasses.replace(_config(sd_file, steps=4), training=dataclasses.replace(
        _config(sd_file).training, max_steps=2, checkpoint_every=2))
    train_adapter(cut, shapes_folder, tmp_path / "resumed", device="cpu", progress=False)
    last = train_adapter(_config(sd_file, steps=4), shapes_folder, tmp_path / "resumed", device="cpu",
                         progress=False)
    assert last["step"] == 4
    a, b = (load_weights(tmp_path / run / "lora.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_targets_the_transformer_layers_and_with_conv_the_3x3_convolutions():
    unet = UNetModel(TINY_SD1[0])
    attention = unet_lora_layers(unet)
    assert attention and all(".transformer_blocks." in n or n.endswith(("proj_in", "proj_out")) for n in attention)
    assert any(n.endswith("attn2.to_k") for n in attention) and any(n.endswith("ff.net.2") for n in attention)
    convs = set(unet_lora_layers(unet, conv=True)) - set(attention)
    assert convs and all(unet.get_submodule(n).kernel_size == (3, 3) for n in convs)
    assert any("in_layers.2" in n for n in convs) and any(n.endswith("op") or ".conv" in n for n in convs)


def test_embedding_run_learns_the_word_and_writes_files_both_tools_read(sd_file, token_folder, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "blob.safetensors"
    cfg = _config(sd_file, kind="embedding", token=TOKEN, vectors=2, init_word="circle", file=str(out))
    train_adapter(cfg, token_folder, tmp_path / "run", device="cpu", progress=False)
    learned = read_embedding(out, TOKEN)
    assert learned.vectors.shape == (2, TINY_SD1[1].width)
    ours = Pipeline.from_pretrained(sd_file, device="cpu")
    start = ours.conditioner.encoder.transformer.embeddings.token_embedding.weight[
        ours.conditioner.encoder.tokenizer.encode("circle")[0]]
    assert (learned.vectors - start).abs().max() > 1e-3  # trained away from its start
    assert ours.load_embedding(out) == "blob"  # AUTOMATIC1111 calls an embedding by its file's name
    copy = tmp_path / "run" / "learned_embeds.safetensors"
    torch.testing.assert_close(read_embedding(copy).vectors, learned.vectors)
    save_model(load_model(sd_file), tmp_path / "diffusers", "diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", safety_checker=None,
                                                               requires_safety_checker=False)
    theirs.load_textual_inversion(str(copy))
    assert TOKEN in theirs.tokenizer.get_vocab()


def test_embedding_training_refuses_captions_without_the_word_and_lora_refuses_text_encoder_of_minilm(
        sd_file, shapes_folder, tmp_path, ldm_run):
    cfg = _config(sd_file, kind="embedding", token=TOKEN, file=str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="none of the 24 training captions contains it"):
        train_adapter(cfg, shapes_folder, tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="LoRA on the text encoder is for CLIP models"):
        train_adapter(_config(ldm_run, text_encoder=True), shapes_folder, tmp_path / "run2", device="cpu",
                      progress=False)
