"""LoRA files in the formats people share (kohya/A1111 and LoCon, diffusers/PEFT and diffusers' older forms) change
our UNet and CLIP text encoder exactly as diffusers' own loader (`load_lora_weights`) changes diffusers' networks;
files that do not fit are one clear error; the files we write load in diffusers.

Every file is written here from random factors, named after the diffusers / transformers modules themselves (or
our CompVis modules for kohya's SGM naming), so the reader's own name tables are what is tested."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latent_diffusion.conditioning import ClipTokenizer
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.formats.keymaps import unet_to_diffusers
from latent_diffusion.files.weights import CheckpointError, load_weights, read_metadata
from latent_diffusion.formats.lora import LoRAError, read_lora, write_lora
from latent_diffusion.nn.lora import LoRA
from latent_diffusion.pipeline import Pipeline

from conftest import TINY_SD1, tiny_original_parts

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two adapters: meant

TOLERANCE = 1e-5
UNET_ALPHA, CONV_ALPHA, TE_ALPHA = 5.0, 1.5, 3.0  # kohya's network_alpha and conv_alpha; none equals a rank
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, 4k"]


def unet_layer(name: str, layer: nn.Module) -> bool:
    """The UNet layers the tests adapt: attention q/k/v/out, proj_in/out, feed-forward, ResBlock convolutions (3×3
    LoCon), time-embedding projections, 1×1 shortcuts, down/upsampling convolutions."""
    return isinstance(layer, (nn.Linear, nn.Conv2d)) and any(
        part in name for part in ("attentions.", "resnets.", "samplers.", "input_blocks.", "output_blocks.",
                                  "middle_block."))


def text_layer(name: str, layer: nn.Module) -> bool:
    """q/k/v/out_proj, fc1, fc2 of every CLIP layer."""
    return isinstance(layer, nn.Linear) and ".layers." in name


def random_factors(model: nn.Module, keep, seed: int, prefix: str = "") -> dict[str, tuple[torch.Tensor, ...]]:
    """(down, up) of rank 2 or 3 for each layer `keep` chooses, by name (with `prefix`); non-zero, scaled so the
    update is a visible fraction of the layer's output."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for i, (name, layer) in enumerate((n, m) for n, m in model.named_modules() if keep(n, m)):
        rank = 2 + i % 2
        if isinstance(layer, nn.Linear):
            shapes = (rank, layer.in_features), (layer.out_features, rank)
        else:
            shapes = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
        factors[prefix + name] = tuple(torch.randn(s, generator=generator) * 0.15 for s in shapes)
    return factors


def hf_name(name: str) -> str:
    """A CLIPTextModel module name with its `text_model.` (transformers 5 builds the model without it)."""
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_file(path, unet: dict, text: dict, alphas: bool = True):
    """A kohya-ss / A1111 file: α = UNET_ALPHA for linear and 1×1 layers, CONV_ALPHA for 3×3 (LoCon), TE_ALPHA."""
    tensors = {}
    for prefix, factors in (("lora_unet_", unet), ("lora_te_", text)):
        for name, (down, up) in factors.items():
            key = prefix + name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            if alphas:
                alpha = TE_ALPHA if prefix == "lora_te_" else CONV_ALPHA if down.shape[2:] == (3, 3) else UNET_ALPHA
                tensors[f"{key}.alpha"] = torch.tensor(alpha).half()  # kohya saves its buffers in the save dtype
    save_file(tensors, path)
    return path


def attention_processor_file(path, unet: nn.Module, text: nn.Module, seed: int):
    """diffusers' older form: `unet.….attn1.processor.to_q_lora.down.weight`,
    `text_encoder.….self_attn.to_q_lora…`, `text_encoder.….mlp.fc1.lora_linear_layer.…` (`save_attn_procs` /
    LoraLoaderMixin before PEFT)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(key: str, layer: nn.Linear, rank: int) -> None:
        tensors[f"{key}.down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.15
        tensors[f"{key}.up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.15

    for name, block in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj, layer in (("to_q", block.to_q), ("to_k", block.to_k), ("to_v", block.to_v),
                                ("to_out", block.to_out[0])):
                add(f"unet.{name}.processor.{proj}_lora", layer, 3)
    for name, block in text.named_modules():
        if name.endswith("self_attn"):
            for proj in ("q", "k", "v", "out"):
                add(f"text_encoder.{hf_name(name)}.to_{proj}_lora", getattr(block, f"{proj}_proj"), 2)
        elif name.endswith(("fc1", "fc2")):
            add(f"text_encoder.{hf_name(name)}.lora_linear_layer", block, 2)
    save_file(tensors, path)
    return path


def peft_file(path, theirs, seed: int, metadata: bool = True):
    """A diffusers / PEFT file as diffusers' training scripts write it: PEFT adapters added to the UNet and text
    encoder (ranks and alphas varying by layer), saved by `save_lora_weights`, with their `LoraConfig`s as
    `lora_adapter_metadata` or without (then diffusers reads α = r)."""
    torch.manual_seed(seed)
    unet_targets = sorted(n for n, m in theirs.unet.named_modules() if unet_layer(n, m))
    text_targets = sorted(n for n, m in theirs.text_encoder.named_modules() if text_layer(n, m))
    configs = {
        "unet": peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=unet_targets, init_lora_weights=False,
                                rank_pattern={unet_targets[0]: 2, unet_targets[5]: 3},
                                alpha_pattern={unet_targets[1]: 2.5, unet_targets[5]: 7.0}),
        "text_encoder": peft.LoraConfig(r=2, lora_alpha=5.0, target_modules=text_targets, init_lora_weights=False,
                                        alpha_pattern={text_targets[2]: 1.0})}
    for part, config in configs.items():  # what `add_adapter` does (transformers' wants peft >= 0.22)
        peft.inject_adapter_in_model(config, getattr(theirs, part))
    with torch.no_grad():  # PEFT's default init leaves a visible but small update: make it larger
        for p in (*theirs.unet.parameters(), *theirs.text_encoder.parameters()):
            if p.requires_grad:
                p.mul_(1.5)
    state = {part: peft.get_peft_model_state_dict(getattr(theirs, part)) for part in configs}
    extra = {f"{part}_lora_adapter_metadata": configs[part].to_dict() for part in configs} if metadata else {}
    diffusers.StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=state["unet"],
                                                        text_encoder_lora_layers=state["text_encoder"],
                                                        weight_name=path.name, **extra)
    return path


def diffusers_pipe(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text-encoder output) of our Pipeline or of diffusers' on fixed inputs."""
    generator = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3.0, 917.0])
    context = torch.randn(2, 5, TINY_SD1[0].context_dim, generator=generator)
    ids = token_ids()
    with torch.no_grad():
        if isinstance(pipe, Pipeline):
            return pipe.unet(x, t, context=context), pipe.conditioner.encoder.transformer(ids)
        return (pipe.unet(x, t, encoder_hidden_states=context).sample,
                pipe.text_encoder(ids).last_hidden_state)


@functools.cache
def token_ids() -> torch.Tensor:
    return ClipTokenizer.from_bpe_file()(PROMPTS)


def written_model(tmp_path_factory, linear: bool):
    """(parts, diffusers folder) of a tiny SD-structured model: transformer projections as 1×1 convolutions
    (SD 1.x) or as Linear layers (SD 2.x)."""
    torch.manual_seed(0)
    parts = tiny_original_parts(TINY_SD1, resolution=32, use_linear_in_transformer=linear)
    folder = tmp_path_factory.mktemp("linear" if linear else "conv")
    write_diffusers(parts, folder)
    return parts, folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The SD 1.x-structured tiny model (1×1-convolution projections) and its diffusers folder."""
    return written_model(tmp_path_factory, linear=False)


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory):
    """The SD 2.x-structured tiny model (Linear projections) and its diffusers folder."""
    return written_model(tmp_path_factory, linear=True)


def assert_same_as_diffusers(ours: Pipeline, theirs, before: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Our UNet and text encoder compute what diffusers' do, to TOLERANCE, and the LoRA changed both."""
    got, expected = outputs(ours), outputs(theirs)
    for name, a, b, plain in zip(("UNet", "text encoder"), got, expected, before, strict=True):
        assert (a - plain).abs().max() > 0.05, f"the LoRA hardly changes the {name}: the test would prove nothing"
        assert (a - b).abs().max() <= TOLERANCE, f"{name}: {(a - b).abs().max():.2e} from diffusers"


def text_factors(theirs, seed: int) -> dict:
    return {hf_name(n): f for n, f in random_factors(theirs.text_encoder, text_layer, seed).items()}


@pytest.mark.parametrize("which,alphas", [("model", True), ("model", False), ("linear_model", True)],
                         ids=["sd1-alphas", "sd1-no-alphas", "sd2-alphas"])
def test_kohya_locon_file_changes_our_networks_as_diffusers_loader_does(which, alphas, request, tmp_path):
    """kohya names from the diffusers UNet and CLIPTextModel; 3×3 convolutions as LoCon; α ≠ rank (a scale of
    α/r per layer) or no α at all (a scale of 1); SD 1.x's 1×1-convolution and SD 2.x's Linear projections."""
    parts, folder = request.getfixturevalue(which)
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    before = outputs(ours)
    unet, text = random_factors(theirs.unet, unet_layer, 1), text_factors(theirs, 2)
    assert any(down.ndim == 4 and down.shape[2:] == (3, 3) for down, _ in unet.values())
    path = kohya_file(tmp_path / "kohya.safetensors", unet, text, alphas)
    ours.load_lora(path)
    theirs.load_lora_weights(str(path))
    assert_same_as_diffusers(ours, theirs, before)
    assert (ours.loras.loaded["kohya"].file.format, len(ours.loras.loaded["kohya"].file.unet)) == ("kohya", len(unet))


def test_kohya_file_with_the_original_compvis_unet_names_loads(model, tmp_path):
    """`lora_unet_input_blocks_1_1_…`: the SGM/CompVis names kohya gives SDXL's UNet (diffusers maps them with the
    UNet's config, `_maybe_map_sgm_blocks_to_diffusers`)."""
    parts, folder = model
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    before = outputs(ours)
    unet = random_factors(ours.unet, unet_layer, 3)
    assert any(name.startswith("input_blocks.") for name in unet)
    path = kohya_file(tmp_path / "sgm.safetensors", unet, text_factors(theirs, 4))
    ours.load_lora(path)
    theirs.load_lora_weights(str(path), unet_config=theirs.unet.config)
    assert_same_as_diffusers(ours, theirs, before)


@pytest.mark.parametrize("metadata", [True, False], ids=["lora_adapter_metadata", "no-metadata"])
def test_peft_file_written_by_diffusers_loads_as_diffusers_loads_it(model, metadata, tmp_path):
    """`unet.….lora_A.weight`: ranks and alphas per layer from the `lora_adapter_metadata` (rank_pattern,
    alpha_pattern); without it α = r."""
    parts, folder = model
    path = peft_file(tmp_path / "peft.safetensors", diffusers_pipe(folder), 5, metadata)
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    before = outputs(ours)
    ours.load_lora(path)
    theirs.load_lora_weights(str(path))
    assert_same_as_diffusers(ours, theirs, before)
    scales = {(w.alpha if w.alpha is not None else w.down.shape[0]) / w.down.shape[0]
              for w in ours.loras.loaded["peft"].file.unet.values()}
    assert scales == ({6 / 4, 6 / 2, 2.5 / 4, 7 / 3} if metadata else {1.0})


def test_older_diffusers_attention_processor_file_loads_as_diffusers_loads_it(model, tmp_path):
    parts, folder = model
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    before = outputs(ours)
    path = attention_processor_file(tmp_path / "procs.safetensors", theirs.unet, theirs.text_encoder, 6)
    ours.load_lora(path, weight=0.7)
    theirs.load_lora_weights(str(path), adapter_name="procs")
    theirs.set_adapters(["procs"], adapter_weights=[0.7])
    assert_same_as_diffusers(ours, theirs, before)


def test_two_loras_at_once_each_with_its_weight(model, tmp_path):
    parts, folder = model
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    before = outputs(ours)
    first = kohya_file(tmp_path / "first.safetensors", random_factors(theirs.unet, unet_layer, 7),
                       text_factors(theirs, 8))
    second = attention_processor_file(tmp_path / "second.safetensors", theirs.unet, theirs.text_encoder, 9)
    assert ours.load_lora(first, weight=0.6) == "first" and ours.load_lora(second, weight=-0.8) == "second"
    theirs.load_lora_weights(str(first), adapter_name="first")
    theirs.load_lora_weights(str(second), adapter_name="second")
    theirs.set_adapters(["first", "second"], adapter_weights=[0.6, -0.8])
    assert_same_as_diffusers(ours, theirs, before)


def test_network_alphas_in_a_diffusers_file_mean_what_kohya_alphas_mean(model, tmp_path):
    """`unet.<layer>.alpha` beside `….lora.down.weight` (diffusers' `network_alphas`): α/r as in the kohya file."""
    parts, _ = model
    ours = Pipeline.from_parts(parts, device="cpu")
    unet = random_factors(ours.unet, lambda n, m: isinstance(m, (nn.Linear, nn.Conv2d)) and "attn2" in n, 10)
    names = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in
             unet_to_diffusers(parts.unet_config, [f"{n}.weight" for n in unet]).items()}
    kohya = {names[n]: f for n, f in unet.items()}
    tensors = {}
    for name, (down, up) in kohya.items():
        tensors.update({f"unet.{name}.lora.down.weight": down, f"unet.{name}.lora.up.weight": up,
                        f"unet.{name}.alpha": torch.tensor(UNET_ALPHA)})
    save_file(tensors, tmp_path / "alphas.safetensors")
    a = read_lora(kohya_file(tmp_path / "k.safetensors", kohya, {}), ours.unet, parts.unet_config)
    b = read_lora(tmp_path / "alphas.safetensors", ours.unet, parts.unet_config)
    assert a.unet.keys() == b.unet.keys() == unet.keys()
    assert all(torch.equal(a.unet[k].down, b.unet[k].down) and a.unet[k].alpha == b.unet[k].alpha == UNET_ALPHA
               for k in unet)


def test_peft_metadata_with_rslora_scales_by_alpha_over_root_rank_and_dora_is_refused(model, tmp_path):
    """peft tuners/lora/layer.py `update_layer`: `use_rslora` makes the scale lora_alpha / √r."""
    parts, _ = model
    ours = Pipeline.from_parts(parts, device="cpu")
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"{layer}.lora_A.weight": torch.randn(4, 64), f"{layer}.lora_B.weight": torch.randn(32, 4)}
    config = {"unet.r": 4, "unet.lora_alpha": 3.0, "unet.use_rslora": True}
    save_file(tensors, tmp_path / "rs.safetensors", {"lora_adapter_metadata": json.dumps(config)})
    (weights,) = read_lora(tmp_path / "rs.safetensors", ours.unet, parts.unet_config).unet.values()
    assert weights.alpha / 4 == pytest.approx(3.0 / 2)
    save_file(tensors, tmp_path / "dora.safetensors", {"lora_adapter_metadata": json.dumps({**config, "unet.use_dora":
                                                                                            True})})
    with pytest.raises(LoRAError, match="makes the unet a DoRA adapter"):
        read_lora(tmp_path / "dora.safetensors", ours.unet, parts.unet_config)


# --- files that do not fit -------------------------------------------------------------------------------------

ATTN2_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def kohya_pair(name: str, rank: int, fan_in: int, fan_out: int) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(rank, fan_in), f"{name}.lora_up.weight": torch.randn(fan_out, rank),
            f"{name}.alpha": torch.tensor(float(rank))}


@pytest.mark.parametrize("tensors,message", [
    ({**kohya_pair(ATTN2_TO_K, 4, 64, 32),
      **kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768)},
     r"this LoRA is for SDXL \(two text encoders.*lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ({**kohya_pair(ATTN2_TO_K, 4, 64, 32), **kohya_pair("lora_unet_down_blocks_0_attentions_7_proj_in", 4, 32, 32)},
     r"3 of its 6 keys name no layer of this model \(e\.g\. \['lora_unet_down_blocks_0_attentions_7_proj_in\.alpha'"),
    (kohya_pair("lora_transformer_single_transformer_blocks_0_attn_to_q", 4, 32, 32),
     "name no layer of this model .* a LoRA for a transformer backbone"),
    (kohya_pair(ATTN2_TO_K, 4, 1024, 32),
     r"do not fit this model's shapes \(e\.g\. \['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
     r"\.lora_down\.weight: down \(4, 1024\).* reads 1024-wide text context where this model's reads 64: a LoRA for "
     r"SD 2\.x"),
    (kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 4, 2048, 640),
     "name no layer of this model .* reads 2048-wide text context where this model's reads 64: a LoRA for SDXL"),
    ({f"{ATTN2_TO_K}.hada_w1_a": torch.randn(4, 32), f"{ATTN2_TO_K}.hada_w1_b": torch.randn(4, 64),
      f"{ATTN2_TO_K}.alpha": torch.tensor(4.0)}, r"adapter kinds this package does not apply: LoHa \(e\.g\."),
    ({f"{ATTN2_TO_K}.lokr_w1": torch.randn(4, 4), f"{ATTN2_TO_K}.lokr_w2": torch.randn(8, 16)}, "LoKr"),
    ({**kohya_pair(ATTN2_TO_K, 4, 64, 32), f"{ATTN2_TO_K}.dora_scale": torch.randn(1, 64)}, "DoRA"),
    ({**kohya_pair(ATTN2_TO_K, 4, 64, 32), f"{ATTN2_TO_K}.lora_mid.weight": torch.randn(4, 4, 3, 3)},
     r"CP/Tucker middle factor \(lora_mid\)"),
    ({f"{ATTN2_TO_K}.lora_down.weight": torch.randn(4, 64)}, r"1 layers lack their down or up factor"),
    ({}, "holds no tensors"),
], ids=["sdxl", "unknown-layer", "flux", "sd2-context", "sdxl-unet", "loha", "lokr", "dora", "lora_mid", "no-up",
        "empty"])
def test_files_that_do_not_fit_are_one_clear_error(model, tensors, message, tmp_path):
    parts, _ = model
    ours = Pipeline.from_parts(parts, device="cpu")
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(LoRAError, match=message):
        ours.load_lora(tmp_path / "bad.safetensors")
    assert not ours.loras.loaded


def test_text_encoder_keys_on_a_model_without_clip_are_an_error_and_unet_keys_load(model, tmp_path):
    parts, _ = model
    ours = Pipeline.from_parts(parts, device="cpu")
    unet_only = kohya_pair(ATTN2_TO_K, 4, 64, 32)
    save_file(unet_only, tmp_path / "unet.safetensors")
    save_file({**unet_only, **kohya_pair("lora_te_text_model_encoder_layers_0_mlp_fc1", 2, 64, 128)},
              tmp_path / "both.safetensors")
    with pytest.raises(LoRAError, match=r"3 keys adapt a CLIP text encoder .* this model's text encoder is 'minilm', "
                                        "not CLIP: use a LoRA of the UNet only"):
        read_lora(tmp_path / "both.safetensors", ours.unet, parts.unet_config, None, "minilm")
    assert len(read_lora(tmp_path / "unet.safetensors", ours.unet, parts.unet_config, None, "minilm").unet) == 1


def test_pickled_files_are_read_safely(model, tmp_path):
    parts, _ = model
    ours = Pipeline.from_parts(parts, device="cpu")
    torch.save(kohya_pair(ATTN2_TO_K, 4, 64, 32), tmp_path / "lora.pt")
    assert len(read_lora(tmp_path / "lora.pt", ours.unet, parts.unet_config).unet) == 1
    torch.save({"lora": nn.Linear(2, 2)}, tmp_path / "module.ckpt")  # a pickle that asks for a class: refused
    with pytest.raises(CheckpointError, match="refused to load .*module.ckpt"):
        read_lora(tmp_path / "module.ckpt", ours.unet, parts.unet_config)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LoRAError, match=r"expected a \.safetensors file"):
        read_lora(tmp_path / "notes.txt", ours.unet, parts.unet_config)


# --- files we write ----------------------------------------------------------------------------------------------

def trained_loras(pipe: Pipeline) -> dict[str, object]:
    """LoRAs as the trainer makes them (`LoRA(model, predicate, rank, alpha)`), their up factors drawn as if
    trained: attention and feed-forward rank 4 α 6, convolutions rank 2 α 1, every CLIP layer rank 2 α 3;
    returns `write_lora`'s layers."""
    torch.manual_seed(11)
    made = {"unet": [LoRA(pipe.unet, lambda n, m: isinstance(m, nn.Linear) and ".transformer_blocks." in n, 4, 6.0),
                     LoRA(pipe.unet, lambda n, m: isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                          and "blocks." in n, 2, 1.0)],
            "text_encoder": [LoRA(pipe.conditioner.encoder.transformer, text_layer, 2, 3.0)]}
    layers = {}
    for part, loras in made.items():
        for lora in loras:
            for name, adapter in lora.by_layer().items():
                nn.init.normal_(adapter.up.weight, std=0.1)
                layers[f"{part}.{name}"] = adapter
    return layers


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_files_we_write_load_back_and_in_diffusers_to_the_same_outputs(model, fmt, tmp_path):
    parts, folder = model
    trainer = Pipeline.from_parts(parts, device="cpu")
    before = outputs(trainer)
    layers = trained_loras(trainer)
    expected = outputs(trainer)
    write_lora(tmp_path / "ours.safetensors", layers, parts.unet_config, fmt, {"ss_network_dim": "4"})
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    ours.load_lora(tmp_path / "ours.safetensors")
    theirs.load_lora_weights(str(tmp_path / "ours.safetensors"))
    for a, b in zip(outputs(ours), expected, strict=True):
        assert (a - b).abs().max() <= 1e-6
    assert_same_as_diffusers(ours, theirs, before)
    file = ours.loras.loaded["ours"].file
    assert (file.format, len(file.unet) + len(file.text_encoder)) == (fmt, len(layers))
    if fmt == "peft":
        config = json.loads(read_metadata(tmp_path / "ours.safetensors")["lora_adapter_metadata"])
        assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (4, 6.0, 3.0)


def test_kohya_file_we_write_has_kohya_keys_and_half_precision_on_request(model, tmp_path):
    parts, _ = model
    layers = trained_loras(Pipeline.from_parts(parts, device="cpu"))
    write_lora(tmp_path / "half.safetensors", layers, parts.unet_config, dtype=torch.float16)
    tensors = load_weights(tmp_path / "half.safetensors")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tensors[f"{key}.alpha"].shape == () and tensors[f"{key}.alpha"].item() == 6.0
    assert tensors[f"{key}.lora_down.weight"].dtype == torch.float16
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors
    with pytest.raises(ValueError, match="must start with 'unet.' or 'text_encoder.'"):
        write_lora(tmp_path / "x.safetensors", {"vae.conv": next(iter(layers.values()))}, parts.unet_config)
