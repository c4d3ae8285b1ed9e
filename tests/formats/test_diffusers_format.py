"""Diffusers folders: what we write loads in diffusers/transformers and computes the same; what we read is exact."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning import ClipTextTransformer, ClipTokenizer, load_clip_text_state_dict
from latent_diffusion.config import (AutoencoderConfig, ClipTextConfig, ConditioningConfig, ConfigError,
                                     DiffusionConfig, SamplingConfig, UNetConfig)
from latent_diffusion.diffusion.schedule import build_schedule
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.diffusers_format import read_diffusers, write_diffusers
from latent_diffusion.formats.model import ModelParts, load_model, save_model
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.unet import UNetModel

from conftest import assert_same_parts, randomised

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

AWKWARD_PROMPTS = [
    "A photo of an astronaut, riding a horse!!! on Mars...",
    "3.14159 apples, 2024-01-01 & #42 (100%)",
    "Café naïve résumé — façade, ŞİŞLİ, e\u0301",
    "😀🐶🔥 emoji party 👍🏽",
    "  multiple    spaces\tand\nnewlines  ",
    "it's the dog's toy, isn't it? we'll see",
    " ".join(["cat", "dog"] * 40),  # 80 tokens: cut to 75 between the start and end tokens
    "",
]


def tiny_parts(sd2: bool = False, penultimate: bool = False, inpaint: bool = False) -> ModelParts:
    """SD 1.x-like (1×1-conv projections, quick-GELU CLIP padded with the end token, ε) or SD 2.x-like (linear
    projections, 8 channels per head, GELU CLIP padded with "!", v-prediction) tiny random model."""
    heads = {"num_head_channels": 8, "use_linear_in_transformer": True} if sd2 else {"num_heads": 2}
    channels = {"in_channels": 9, "concat_channels": 5} if inpaint else {}
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                      context_dim=32, norm_groups=8, **heads, **channels)
    autoencoder = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=32,
                                    latent_scale=0.7)
    clip = ClipTextConfig(width=32, layers=3 if penultimate else 2, heads=4, mlp_width=37,
                          hidden_act="gelu" if sd2 else "quick_gelu", pad_token_id=0 if sd2 else None,
                          layer="penultimate" if penultimate else "last")
    return ModelParts(
        unet_config=unet, unet=randomised(UNetModel(unet), 1).state_dict(),
        autoencoder_config=autoencoder, autoencoder=randomised(AutoencoderKL(autoencoder), 2).state_dict(),
        conditioning=ConditioningConfig(encoder="clip", clip=clip, spatial="inpaint" if inpaint else "none"),
        text_encoder=randomised(ClipTextTransformer(clip), 3).state_dict(),
        diffusion=DiffusionConfig(prediction_type="v_prediction" if sd2 else "epsilon", p_uncond=0.2),
        sampling=SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                prompts=("a cat",), steps=12),
        resolution=32)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def written(request, tmp_path_factory):
    """(parts, folder): a tiny SD1- or SD2-like model written as a diffusers folder."""
    parts = tiny_parts(sd2=request.param == "sd2")
    folder = tmp_path_factory.mktemp(request.param)
    write_diffusers(parts, folder)
    return parts, folder


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_written_folder_has_the_diffusers_layout(written):
    _, folder = written
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
                 "scheduler/scheduler_config.json"):
        assert (folder / name).is_file(), name
    assert all(k.startswith("text_model.") for k in load_file(folder / "text_encoder" / "model.safetensors"))


def test_unet_matches_diffusers_unet(written):
    parts, folder = written
    ours = UNetModel(parts.unet_config).eval()
    ours.load_state_dict(parts.unet)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert max_diff(ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample) <= 1e-4


def test_autoencoder_matches_diffusers_autoencoder(written):
    parts, folder = written
    ours = AutoencoderKL(parts.autoencoder_config).eval()
    ours.load_state_dict(parts.autoencoder)
    theirs = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    x, z = torch.randn(2, 3, 16, 24), torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        assert max_diff(ours.encode(x).mean, theirs.encode(x).latent_dist.mean) <= 1e-4
        assert max_diff(ours.decode(z), theirs.decode(z).sample) <= 1e-4
    assert theirs.config.scaling_factor == parts.autoencoder_config.latent_scale


def our_text_encoder(parts: ModelParts) -> ClipTextTransformer:
    model = ClipTextTransformer(parts.conditioning.clip).eval()
    load_clip_text_state_dict(model, parts.text_encoder)
    return model


@pytest.mark.parametrize("penultimate", [False, True])
def test_text_encoder_matches_transformers_clip(penultimate, tmp_path):
    """An SD 2-style 'penultimate' encoder is written as CLIPTextModel with one layer less, used to its last layer."""
    parts = tiny_parts(sd2=penultimate, penultimate=penultimate)
    write_diffusers(parts, tmp_path)
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    assert theirs.config.num_hidden_layers == 2
    ids = ClipTokenizer.from_bpe_file()(["a photo of a cat", "", "an astronaut riding a horse on mars, 4k"])
    with torch.no_grad():
        assert max_diff(our_text_encoder(parts)(ids), theirs(input_ids=ids).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("pad_token_id,pad_token", [(None, "<|endoftext|>"), (0, "!")])
def test_tokenizer_matches_transformers_tokenizer(pad_token_id, pad_token, tmp_path):
    """Padded to 77 with the end token (SD 1.x) or "!" (SD 2.x); over-long prompts cut; see the next test for "!"."""
    parts = tiny_parts()
    clip = dataclasses.replace(parts.conditioning.clip, pad_token_id=pad_token_id)
    write_diffusers(dataclasses.replace(parts, conditioning=ConditioningConfig(encoder="clip", clip=clip)), tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert theirs.pad_token == pad_token
    prompts = [p for p in AWKWARD_PROMPTS if pad_token_id is None or "!" not in p]
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for tokenizer in (ClipTokenizer.from_bpe_file(pad_id=pad_token_id), read_diffusers(tmp_path).tokenizer):
        with pytest.warns(UserWarning, match="5 tokens were cut"):
            assert torch.equal(tokenizer(prompts), expected)


def test_exclamation_mark_is_a_word_as_in_openclip_not_the_pad_token_as_in_transformers(tmp_path):
    """transformers' CLIPTokenizer treats every "!" in an SD 2.x prompt as its pad token (id 0), unlike OpenCLIP, the
    tokenizer SD 2.x was trained with (diffusers#4153); ours keeps OpenCLIP's "!</w>" (id 256)."""
    parts = tiny_parts(sd2=True)
    write_diffusers(parts, tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert theirs("hi !").input_ids == [49406, 1883, 0, 49407]
    assert read_diffusers(tmp_path).tokenizer(["hi !"])[0, :4].tolist() == [49406, 1883, 256, 49407]


def test_text_to_image_matches_diffusers_pipeline(written):
    """Same prompt, initial noise, DDIM grid (leading, offset 1, ᾱ_0 last), 10 steps, guidance 7.5: same image."""
    parts, folder = written
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                               requires_safety_checker=False)
    assert type(theirs.scheduler).__name__ == "DDIMScheduler"
    ours = Pipeline.from_parts(parts, device="cpu")
    prompt, seed = "a red cube, on a table; 4k.", 7  # no "!": see the test above
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    expected = theirs(prompt, height=32, width=32, num_inference_steps=10, guidance_scale=7.5, latents=noise,
                      output_type="pt").images
    options = dict(steps=10, guidance_scale=7.5, sampler="ddim", seed=seed, height=32, width=32, progress=False)
    got = ours.generate_tensors(prompt, **options)
    assert max_diff((got + 1) / 2, expected) <= 1e-3
    assert torch.equal(Pipeline.from_pretrained(folder, device="cpu").generate_tensors(prompt, **options), got)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "inpaint"])
def test_native_to_diffusers_to_native_is_exact(kind, tmp_path):
    parts = tiny_parts(sd2=kind == "sd2", inpaint=kind == "inpaint")
    save_model(parts, tmp_path / "native", "native")
    save_model(load_model(tmp_path / "native"), tmp_path / "diffusers", "diffusers")
    again = load_model(tmp_path / "diffusers")
    assert_same_parts(parts, again)
    tokenizer = ClipTokenizer.from_bpe_file(pad_id=parts.conditioning.clip.pad_token_id)
    assert (again.tokenizer.vocab, again.tokenizer.merges) == (tokenizer.vocab, tokenizer.merges)
    assert again.tokenizer.pad_id == tokenizer.pad_id


@pytest.mark.parametrize("sd2", [False, True])
def test_folder_whose_tokenizer_transformers_saved_as_tokenizer_json_loads(sd2, tmp_path):
    """transformers 5 saves a CLIPTokenizer as tokenizer.json + tokenizer_config.json: the model loads, with the
    vocabulary, pad token and ids of the tokenizer saved."""
    parts = tiny_parts(sd2=sd2)
    write_diffusers(parts, tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    shutil.rmtree(tmp_path / "tokenizer")
    theirs.save_pretrained(tmp_path / "tokenizer")
    for name in ("vocab.json", "merges.txt"):  # what transformers 4 writes besides: test the tokenizer.json alone
        (tmp_path / "tokenizer" / name).unlink(missing_ok=True)
    loaded = load_model(tmp_path)
    assert_same_parts(parts, loaded)
    prompts = [p for p in AWKWARD_PROMPTS if not sd2 or "!" not in p]  # "!": see the test above
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="5 tokens were cut"):
        assert torch.equal(loaded.tokenizer(prompts), expected)


@pytest.mark.parametrize("diffusion,sampling", [
    (DiffusionConfig(), SamplingConfig()),
    (DiffusionConfig(schedule="cosine", zero_terminal_snr=True, prediction_type="v_prediction"),
     SamplingConfig(sampler="plms", timestep_spacing="trailing")),
    (DiffusionConfig(schedule="linear", num_timesteps=500, min_snr_gamma=5.0),
     SamplingConfig(sampler="plms", steps_offset=1, set_alpha_to_one=True)),
])
def test_schedule_and_sampler_settings_round_trip_and_match_the_diffusers_scheduler(diffusion, sampling, tmp_path):
    write_diffusers(dataclasses.replace(tiny_parts(), diffusion=diffusion, sampling=sampling), tmp_path)
    again = read_diffusers(tmp_path)
    assert (again.diffusion, again.sampling) == (diffusion, sampling)
    name = json.loads((tmp_path / "model_index.json").read_text())["scheduler"][1]
    assert name == ("PNDMScheduler" if sampling.sampler == "plms" and not diffusion.zero_terminal_snr
                    else "DDIMScheduler")
    scheduler = getattr(diffusers, name).from_pretrained(tmp_path / "scheduler")
    expected = build_schedule(diffusion).alphas_cumprod.float()
    assert max_diff(scheduler.alphas_cumprod, expected) <= 1e-6


def test_penultimate_text_encoder_reads_back_as_an_equal_shorter_one(tmp_path):
    parts = tiny_parts(sd2=True, penultimate=True)
    write_diffusers(parts, tmp_path)
    again = read_diffusers(tmp_path)
    assert again.conditioning.clip == dataclasses.replace(parts.conditioning.clip, layers=2, layer="last")
    ids = again.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        assert torch.equal(our_text_encoder(again)(ids), our_text_encoder(parts)(ids))


def test_half_precision_and_pickled_weights_are_read(tmp_path):
    parts = tiny_parts().to(torch.float16)
    write_diffusers(parts, tmp_path)
    unet_file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({k: v.to(torch.bfloat16) for k, v in load_file(unet_file).items()},
               tmp_path / "unet" / "diffusion_pytorch_model.bin")
    unet_file.unlink()
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae_file.rename(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    again = read_diffusers(tmp_path)
    assert again.unet["out.2.weight"].dtype == torch.bfloat16
    assert all(torch.equal(again.unet[k], v.to(torch.bfloat16)) for k, v in parts.unet.items())
    assert all(torch.equal(again.autoencoder[k], v) and again.autoencoder[k].dtype == torch.float16
               for k, v in parts.autoencoder.items())


def test_legacy_vae_attention_names_are_read(tmp_path):
    parts = tiny_parts()
    write_diffusers(parts, tmp_path)
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(path).items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        tensors[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    save_file(tensors, path)
    again = read_diffusers(tmp_path)
    assert all(torch.equal(again.autoencoder[k], v) for k, v in parts.autoencoder.items())


def test_prediction_type_argument_overrides_the_scheduler(written):
    parts, folder = written
    assert read_diffusers(folder).diffusion.prediction_type == parts.diffusion.prediction_type
    assert read_diffusers(folder, prediction_type="sample").diffusion.prediction_type == "sample"


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("file,changes,message", [
    ("unet/config.json", {"addition_embed_type": "text"}, "addition_embed_type = 'text' .*is not supported"),
    ("unet/config.json", {"down_block_types": ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
     r"down_block_types\[0\] = 'SimpleCrossAttnDownBlock2D' is not supported"),
    ("unet/config.json", {"class_embed_type": "timestep"}, "class_embed_type = 'timestep'"),
    ("unet/config.json", {"only_cross_attention": True}, "only_cross_attention = True is not supported"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "sigmoid"}, "beta_schedule = 'sigmoid'"),
    ("text_encoder/config.json", {"hidden_act": "relu"}, "hidden_act = 'relu'"),
    ("model_index.json", {"transformer": ["diffusers", "FluxTransformer2DModel"]}, "component transformer"),
])
def test_unsupported_settings_are_clear_errors(file, changes, message, tmp_path):
    write_diffusers(tiny_parts(), tmp_path)
    edit_json(tmp_path / file, **changes)
    with pytest.raises(ConfigError, match=message):
        read_diffusers(tmp_path)


def test_missing_tokenizer_is_a_clear_error_naming_the_files_accepted(tmp_path):
    write_diffusers(tiny_parts(), tmp_path)
    (tmp_path / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"needs its CLIP tokenizer: tokenizer folder .*tokenizer holds "
                                              r"merges.txt, .*: expected vocab.json with merges.txt .* or "
                                              r"tokenizer.json"):
        read_diffusers(tmp_path)


@pytest.mark.parametrize("pickled", [False, True])
def test_truncated_weights_are_a_clear_error_naming_the_file(pickled, tmp_path):
    write_diffusers(tiny_parts(), tmp_path)
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    if pickled:
        torch.save(load_file(path), path.with_suffix(".bin"))
        path.unlink()
        path = path.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*vae/{path.name}"):
        read_diffusers(tmp_path)


def test_missing_weights_are_a_clear_error_listing_the_expected_files(tmp_path):
    write_diffusers(tiny_parts(), tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet: no weights file; expected one of "
                                              r"diffusion_pytorch_model.safetensors, diffusion_pytorch_model.bin"):
        read_diffusers(tmp_path)


def test_weights_that_do_not_fit_the_config_name_the_keys(tmp_path):
    write_diffusers(tiny_parts(), tmp_path)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["conv_in.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \['conv_in.weight'\]"):
        read_diffusers(tmp_path)


def test_models_diffusers_cannot_hold_are_refused_before_writing(tmp_path):
    parts = tiny_parts()
    no_context = dataclasses.replace(parts, unet_config=dataclasses.replace(parts.unet_config, context_dim=None))
    with pytest.raises(ConfigError, match="context_dim = None"):
        write_diffusers(no_context, tmp_path)
    with_attention = dataclasses.replace(parts, autoencoder_config=dataclasses.replace(
        parts.autoencoder_config, attn_resolutions=(16,)))
    with pytest.raises(ConfigError, match="attn_resolutions"):
        write_diffusers(with_attention, tmp_path)
