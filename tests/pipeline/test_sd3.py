"""Stable Diffusion 3: a diffusers SD3 folder (tiny random weights, built by diffusers itself) loads and draws what
diffusers' StableDiffusion3Pipeline with FlowMatchEulerDiscreteScheduler draws, with T5 and without; the three
formats convert among themselves bit for bit; the command line generates and converts; what SD3 cannot take yet
is refused clearly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_same_parts
from latent_diffusion.files.weights import CheckpointError, load_weights, save_weights
from latent_diffusion.formats.model import load_model, save_model
from latent_diffusion.images import pil_to_tensor
from latent_diffusion.pipeline import Pipeline
from sd3_fixtures import SD3_PROMPTS, load_tiny_sd3_diffusers, tiny_sd3_diffusers

diffusers = pytest.importorskip("diffusers")

T5_LENGTH = 16  # T5 tokens per prompt (diffusers' max_sequence_length), short for speed
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": tiny_sd3_diffusers(root / "t5", seed=0),
            "no-t5": tiny_sd3_diffusers(root / "no-t5", seed=1, with_t5=False),
            "sd3.5": tiny_sd3_diffusers(root / "sd3.5", seed=2, qk_norm="rms_norm", dual_attention_layers=(0,))}


def _ours(folder, **kwargs) -> Pipeline:
    parts = load_model(folder)
    parts.conditioning = dataclasses.replace(parts.conditioning, t5_max_length=T5_LENGTH)
    return Pipeline.from_parts(parts, "cpu", **kwargs)


@pytest.mark.parametrize("variant", ["t5", "no-t5", "sd3.5"])
def test_images_equal_diffusers_stable_diffusion_3(folders, variant):
    theirs = load_tiny_sd3_diffusers(folders[variant])
    expected = theirs(prompt=SD3_PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=5.0,
                      generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="pt",
                      max_sequence_length=T5_LENGTH, **SIZE).images
    ours = _ours(folders[variant]).generate_tensors(SD3_PROMPTS, negative_prompt="blurry", steps=4,
                                                    guidance_scale=5.0, seed=3, progress=False, **SIZE)
    torch.testing.assert_close((ours + 1) / 2, expected, atol=1e-4, rtol=0)
    assert expected.std() > 0.05


def test_the_three_formats_convert_bit_for_bit_and_diffusers_reads_ours(folders, tmp_path):
    parts = load_model(folders["sd3.5"])
    assert parts.unet_config.qk_norm and parts.unet_config.dual_attention_layers == (0,)
    assert parts.autoencoder_config.latent_shift == pytest.approx(0.0609) and not parts.autoencoder_config.quant_conv
    for fmt, path in (("native", tmp_path / "native"), ("original", tmp_path / "single" / "sd3.safetensors"),
                      ("diffusers", tmp_path / "diffusers")):
        save_model(parts, path, fmt)
        again = load_model(path)
        assert_same_parts(dataclasses.replace(parts, autoencoder_config=dataclasses.replace(
            parts.autoencoder_config, resolution=again.autoencoder_config.resolution)), again)
    keys = load_weights(tmp_path / "single" / "sd3.safetensors")
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in keys
    assert "text_encoders.clip_l.transformer.text_projection.weight" in keys  # not SD3's identity: kept
    identity = {**parts.text_encoder, "clip.text_projection.weight": torch.eye(32)}
    save_model(dataclasses.replace(parts, text_encoder=identity), tmp_path / "eye" / "sd3.safetensors", "original")
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in load_weights(tmp_path / "eye" /
                                                                                          "sd3.safetensors")
    assert torch.equal(load_model(tmp_path / "eye" / "sd3.safetensors").text_encoder["clip.text_projection.weight"],
                       torch.eye(32))
    theirs = load_tiny_sd3_diffusers(tmp_path / "diffusers")
    original = load_tiny_sd3_diffusers(folders["sd3.5"])
    kwargs = dict(prompt=SD3_PROMPTS[:1], num_inference_steps=2, output_type="pt", max_sequence_length=T5_LENGTH,
                  **SIZE)
    assert torch.equal(theirs(generator=torch.Generator().manual_seed(0), **kwargs).images,
                       original(generator=torch.Generator().manual_seed(0), **kwargs).images)


def test_a_single_file_reads_t5s_tokenizer_beside_it_or_where_it_is_told(folders, tmp_path):
    parts = load_model(folders["t5"])
    save_model(parts, tmp_path / "a" / "sd3.safetensors", "original")
    assert (tmp_path / "a" / "tokenizer_3" / "tokenizer.json").is_file()
    tensors = load_weights(tmp_path / "a" / "sd3.safetensors")
    # as Stability writes SD3 files: no metadata of ours (but this tiny VAE's GroupNorm), no tokenizer beside
    save_weights(dict(tensors), tmp_path / "b" / "sd3.safetensors", metadata={"ldm.norm_groups": "8"})
    with pytest.raises(CheckpointError, match="holds a T5 encoder, whose tokenizer is not in the file: put a "
                                              "diffusers SD3 folder's tokenizer_3/ beside it"):
        load_model(tmp_path / "b" / "sd3.safetensors")
    bare = load_model(tmp_path / "b" / "sd3.safetensors", t5_tokenizer=folders["t5"] / "tokenizer_3")
    assert bare.unet_config.num_heads == 1  # without our metadata, heads are taken 64 wide, as SD3's
    shapes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets")
    assert {k: bare.conditioning.t5[k] for k in shapes} == {k: parts.conditioning.t5[k] for k in shapes}
    no_clip = {k: v for k, v in tensors.items() if not k.startswith("text_encoders.clip_g.")}
    save_weights(no_clip, tmp_path / "c" / "sd3.safetensors", metadata={"ldm.norm_groups": "8"})
    with pytest.raises(CheckpointError, match="holds no text_encoders.clip_g.transformer.\\*: an SD3 file without"):
        load_model(tmp_path / "c" / "sd3.safetensors", t5_tokenizer=folders["t5"] / "tokenizer_3")


def test_ldm_generate_and_convert_on_the_command_line(folders, tmp_path, monkeypatch):
    from latent_diffusion.cli import main
    monkeypatch.chdir(tmp_path)
    main(["convert", str(folders["t5"]), "single/sd3.safetensors", "--to", "original"])
    main(["generate", SD3_PROMPTS[0], "--model", "single/sd3.safetensors", "--steps", "3", "--seed", "5",
          "--height", "32", "--width", "32", "--negative", "blurry", "-o", "sd3.png"])
    expected = Pipeline.from_pretrained(folders["t5"], device="cpu")(SD3_PROMPTS[0], negative_prompt="blurry", steps=3,
                                                                     seed=5, progress=False, **SIZE)[0]
    got = Image.open("sd3.png").convert("RGB")
    assert torch.equal(pil_to_tensor(got), pil_to_tensor(expected))
    assert np.asarray(got).std() > 5


def test_what_sd3_models_cannot_take_yet_is_refused(folders, tmp_path):
    pipe = _ours(folders["no-t5"])
    for load, what in ((lambda: pipe.load_lora(tmp_path / "x.safetensors"), "a LoRA"),
                       (lambda: pipe.load_embedding(tmp_path / "x.pt"), "a textual-inversion embedding")):
        with pytest.raises(ValueError, match=f"{what}: an SD3 model takes none yet"):
            load()
    with pytest.raises(ValueError, match="dpmpp_2m samples diffusion models; this model is a flow model"):
        pipe.generate_tensors("x", steps=2, sampler="dpmpp_2m", progress=False, **SIZE)
    with pytest.raises(ValueError, match="height = 96: this model's MMDiT knows patch positions for images of at "
                                         "most 64 pixels a side \\(mmdit.pos_embed_max_size = 16 patches\\)"):
        pipe.generate_tensors("x", steps=2, height=96, width=32, progress=False)  # refused before any work
    with pytest.raises(ValueError, match="backend 'openvino' compiles SD 1.x/2.x-style UNets"):
        Pipeline.from_pretrained(folders["no-t5"], device="cpu", backend="openvino")


def test_bf16_weights_draw_what_fp32_draws(folders):
    """bf16 storage, the math as the host's rule says (T5's feed-forward cast as one: transformers casts its input
    to the output layer's dtype)."""
    kwargs = dict(steps=3, seed=1, progress=False, **SIZE)
    fp32 = _ours(folders["t5"]).generate_tensors(SD3_PROMPTS[0], **kwargs)
    bf16 = _ours(folders["t5"], precision="bf16").generate_tensors(SD3_PROMPTS[0], **kwargs)
    assert (bf16 - fp32).abs().mean() < 0.03


def test_reader_options_a_format_does_not_take_are_refused(folders):
    with pytest.raises(ValueError, match="t5_tokenizer: not an option of the diffusers format's reader, which takes "
                                         "prediction_type \\(t5_tokenizer is for SD3 single files"):
        load_model(folders["t5"], t5_tokenizer="x")
