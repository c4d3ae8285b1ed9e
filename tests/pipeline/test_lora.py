"""LoRAs on a Pipeline: the images diffusers draws with the same LoRA files and weights; fusing, unfusing and
unloading restore exactly; the hooks reach every layer the inference classes compute another way; bf16 storage;
the compiled backends; models without CLIP take UNet LoRAs only."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latent_diffusion.config import SamplingConfig
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.formats.lora import LoRAError, read_lora
from latent_diffusion.inference import conv, layers
from latent_diffusion.nn.lora import LoRA
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.unet import UNetModel

from conftest import TINY_SD1, tiny_original_parts
from formats.test_lora import (attention_processor_file, diffusers_pipe, kohya_file, random_factors, text_factors,
                               unet_layer)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two adapters: meant

PROMPT = "a red cube, on a table; 4k."
DDIM = SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      prompts=("a cat",), steps=3, guidance_scale=7.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(parts, diffusers folder, LoRA files) of a tiny SD 1.x-structured model sampled by DDIM as diffusers' DDIM
    scheduler does: a kohya LoCon file of its UNet and text encoder, and an attention-processor file."""
    torch.manual_seed(0)
    parts = dataclasses.replace(tiny_original_parts(TINY_SD1, resolution=32), sampling=DDIM)
    folder = tmp_path_factory.mktemp("sd1")
    write_diffusers(parts, folder)
    theirs = diffusers_pipe(folder)
    files = {"kohya": kohya_file(folder / "kohya.safetensors", random_factors(theirs.unet, unet_layer, 1),
                                 text_factors(theirs, 2)),
             "procs": attention_processor_file(folder / "procs.safetensors", theirs.unet, theirs.text_encoder, 3)}
    return parts, folder, files


def outputs(pipe: Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_θ of the UNet at the pipeline's math precision, text-encoder output) on fixed inputs."""
    generator = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3.0, 917.0])
    context = torch.randn(2, 5, pipe.config.unet.context_dim, generator=generator)
    encoder = pipe.conditioner.encoder
    with torch.no_grad():
        return pipe.network(x, t, context=context), encoder.transformer(encoder.tokenizer([PROMPT, ""])).float()


def weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """Copies of every UNet and text-encoder weight."""
    return {f"{part}.{name}": p.detach().clone() for part, module in
            (("unet", pipe.unet), ("text_encoder", pipe.conditioner.encoder.transformer))
            for name, p in module.named_parameters()}


def same_weights(pipe: Pipeline, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(expected[name], tensor) for name, tensor in weights(pipe).items())


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("loras", [[("kohya", 0.8)], [("kohya", 0.6), ("procs", -0.8)]], ids=["one", "two"])
def test_images_are_those_diffusers_draws_with_the_same_loras_and_weights(model, loras):
    """DDIM (leading, offset 1), 3 steps, guidance 7.5, the same initial noise: the same images to 1e-4."""
    parts, folder, files = model
    ours, theirs = Pipeline.from_parts(parts, device="cpu"), diffusers_pipe(folder)
    for name, weight in loras:
        ours.load_lora(files[name], weight=weight)
        theirs.load_lora_weights(str(files[name]), adapter_name=name)
    theirs.set_adapters([name for name, _ in loras], adapter_weights=[weight for _, weight in loras])
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    expected = theirs(PROMPT, height=32, width=32, num_inference_steps=3, guidance_scale=7.5, latents=noise,
                      output_type="pt").images
    options = dict(steps=3, guidance_scale=7.5, sampler="ddim", seed=7, height=32, width=32, progress=False)
    got = (ours.generate_tensors(PROMPT, **options) + 1) / 2
    ours.unload_lora()
    plain = (ours.generate_tensors(PROMPT, **options) + 1) / 2
    assert (got - plain).abs().max() > 0.01, "the LoRAs hardly change the image: the test would prove nothing"
    assert (got - expected).abs().max() <= 1e-4


def test_fuse_unfuse_and_unload_restore_the_weights_bit_for_bit(model):
    parts, _, files = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    original, plain = weights(pipe), outputs(pipe)
    pipe.load_lora(files["kohya"], weight=0.6)
    pipe.load_lora(files["procs"], weight=-0.8)
    on_the_fly = outputs(pipe)
    assert same_weights(pipe, original) and max_diff(on_the_fly, plain) > 0.05
    pipe.fuse_lora()
    assert not same_weights(pipe, original) and max_diff(outputs(pipe), on_the_fly) <= 1e-5
    pipe.unfuse_lora()
    assert same_weights(pipe, original) and max_diff(outputs(pipe), on_the_fly) == 0
    pipe.fuse_lora()
    pipe.unload_lora("kohya")  # the one fused first: the other is unfused, then fused again alone
    assert all(adapter.fused for adapter in pipe.loras.loaded["procs"].adapters)
    procs_fused = outputs(pipe)
    pipe.unfuse_lora()
    assert same_weights(pipe, original) and max_diff(outputs(pipe), procs_fused) <= 1e-5
    pipe.unload_lora()
    assert same_weights(pipe, original) and max_diff(outputs(pipe), plain) == 0


def test_on_the_fly_loras_reach_the_layers_the_inference_classes_compute_another_way(model, monkeypatch):
    """3×3 convolutions as matmuls (`MatmulConv2d`), upsampling by phases (`PhaseUpsample`), the feed-forward in
    chunks (`ChunkedFeedForward`), made to take their fast paths at this size: the hooked (on the fly) and fused
    LoRA give the plain network's output with the LoRA folded in."""
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(layers, "PHASES_MIN_PIXELS", 0)
    monkeypatch.setattr(layers.ChunkedFeedForward, "CHUNK_TOKENS", 16)
    calls = Counter()
    for name in ("conv3x3_as_matmul", "upsampled_conv3x3"):
        monkeypatch.setattr(conv, name, lambda *a, _name=name, _f=getattr(conv, name), **k: (
            calls.update([_name]), _f(*a, **k))[1])
    parts, _, files = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    kinds = {type(m) for m in pipe.unet.modules()}
    assert {layers.MatmulConv2d, layers.PhaseUpsample, layers.ChunkedFeedForward} <= kinds
    plain = UNetModel(parts.unet_config).eval()  # the network's own forward, no inference classes
    plain.load_state_dict(parts.unet)
    file = read_lora(files["kohya"], plain, parts.unet_config, pipe.conditioner.encoder.transformer)
    LoRA.from_weights(plain, file.unet, scale=0.7).fuse()
    generator = torch.Generator().manual_seed(5)
    x, t, context = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3.0, 917.0]), torch.randn(2, 5, 64)
    with torch.no_grad():
        expected, without = plain(x, t, context=context), pipe.unet(x, t, context=context)
        assert (expected - without).abs().max() > 0.05 and calls["upsampled_conv3x3"] > 0
        calls.clear()
        pipe.load_lora(files["kohya"], weight=0.7)
        on_the_fly = pipe.unet(x, t, context=context)
        assert calls["conv3x3_as_matmul"] > 0 and calls["upsampled_conv3x3"] == 0  # hooked: the plain path
        pipe.fuse_lora()
        fused = pipe.unet(x, t, context=context)
        assert calls["upsampled_conv3x3"] > 0
    assert (on_the_fly - expected).abs().max() <= 1e-5 and (fused - expected).abs().max() <= 1e-5


def test_loras_on_a_bf16_pipeline(model):
    """Weights kept in bf16: the update computed in fp32 beside them, or fused and rounded once; unfused and
    unloaded exactly."""
    parts, _, files = model
    pipe = Pipeline.from_parts(parts, device="cpu", precision="bf16")
    assert pipe.unet.out[2].weight.dtype == torch.bfloat16
    original, plain = weights(pipe), outputs(pipe)
    pipe.load_lora(files["kohya"], weight=0.8)
    on_the_fly = outputs(pipe)
    change = max_diff(on_the_fly, plain)
    pipe.fuse_lora()
    assert change > 0.05 and max_diff(outputs(pipe), on_the_fly) < change / 4
    pipe.unfuse_lora()
    assert same_weights(pipe, original)
    pipe.unload_lora()
    assert max_diff(outputs(pipe), plain) == 0


@pytest.mark.parametrize("backend", ["openvino", "inductor"])
def test_compiled_backends_keep_loras_fused_and_compile_the_unet_again(model, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    parts, _, files = model
    pipe = Pipeline.from_parts(parts, device="cpu", backend=backend)
    original = weights(pipe)
    pipe._compiled[backend] = "compiled from the weights without the LoRA"
    pipe.load_lora(files["kohya"])
    assert not pipe._compiled and all(a.fused for a in pipe.loras.loaded["kohya"].adapters)
    assert not same_weights(pipe, original)
    with pytest.raises(ValueError, match=f"backend '{backend}' runs the UNet compiled with its weights: its LoRAs "
                                         "stay fused"):
        pipe.unfuse_lora()
    pipe._compiled[backend] = "compiled from the weights with the LoRA"
    pipe.unload_lora()
    assert not pipe._compiled and same_weights(pipe, original)


def test_backend_auto_keeps_on_the_fly_loras_on_pytorch(model, tmp_path, monkeypatch):
    """Hooks cannot reach a compiled graph: with a LoRA applied on the fly, auto runs every call in PyTorch; fused,
    the LoRA is in the weights (hence in the cached graph's key) and the compiled backends may run again. With no
    graph in a backend's cache at all, auto does not even look (nor import its compiler)."""
    parts, _, files = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    context = {"context": torch.zeros(1)}
    for backend in ("openvino", "inductor"):
        monkeypatch.setenv(f"LDM_{backend.upper()}_CACHE", str(tmp_path / backend))
    assert pipe.backend == "auto" and pipe._compiled_may_run(context) == ()  # empty caches
    compiled = ("openvino",) if importlib.util.find_spec("openvino") is not None else ()
    for backend, artefact in (("openvino", "unet.xml"), ("inductor", "unet.pt2")):
        (tmp_path / backend / "a-graph").mkdir(parents=True)
        (tmp_path / backend / "a-graph" / artefact).touch()  # some graph (of other weights: `ready` tells them apart)
    compiled += ("inductor",)
    assert pipe._compiled_may_run(context) == compiled
    pipe.load_lora(files["kohya"])
    assert pipe.loras.on_the_fly() and pipe._compiled_may_run(context) == ()
    pipe.fuse_lora()
    assert not pipe.loras.on_the_fly() and pipe._compiled_may_run(context) == compiled


def test_loras_are_named_and_unloaded_by_name(model):
    parts, _, files = model
    pipe = Pipeline.from_parts(parts, device="cpu")
    assert pipe.load_lora(files["kohya"]) == "kohya"
    with pytest.raises(ValueError, match="a LoRA named 'kohya' is loaded already"):
        pipe.load_lora(files["kohya"])
    assert pipe.load_lora(files["kohya"], weight=-1.0, name="opposite") == "opposite"
    with pytest.raises(KeyError, match="no LoRA named 'nope' is loaded \\(loaded: kohya, opposite\\)"):
        pipe.unload_lora("nope")
    pipe.unload_lora("kohya")
    assert list(pipe.loras.loaded) == ["opposite"]


def test_the_bundled_minilm_model_takes_unet_loras_and_refuses_text_encoder_ones(bundled_pipe, tmp_path):
    unet = random_factors(bundled_pipe.unet, lambda n, m: isinstance(m, nn.Linear) and ".attn2." in n, 4)
    path = kohya_file(tmp_path / "unet.safetensors", unet, {})
    cfg = bundled_pipe.config.unet
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, cfg.in_channels, 8, 8, generator=generator), torch.tensor([500.0])
    context = torch.randn(1, 6, cfg.context_dim, generator=generator)
    with torch.no_grad():
        plain = bundled_pipe.network(x, t, context=context)
        bundled_pipe.load_lora(path)
        adapted = bundled_pipe.network(x, t, context=context)
        bundled_pipe.unload_lora()
        assert (adapted - plain).abs().max() > 1e-3 and torch.equal(bundled_pipe.network(x, t, context=context), plain)
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 2)},
              tmp_path / "te.safetensors")
    with pytest.raises(LoRAError, match="this model's text encoder is 'minilm', not CLIP"):
        bundled_pipe.load_lora(tmp_path / "te.safetensors")
