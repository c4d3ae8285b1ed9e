"""Reduced-precision inference: bf16 weights (half the memory) with the math in bf16, or in fp32 on CPUs whose bf16
matmuls are slower (layerwise casting, `runtime.store_weights`)."""

import copy

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning import ClipTextTransformer
from latent_diffusion.config import AutoencoderConfig, ClipTextConfig, ConditioningConfig, SamplingConfig, UNetConfig
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.runtime import (_malloc_trim, cpu_bf16_math_pays, math_precision, release_free_memory,
                                     store_weights)
from latent_diffusion.unet import UNetModel

from conftest import randomised


def tiny_sd_parts() -> ModelParts:
    torch.manual_seed(0)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                      context_dim=32, norm_groups=8, num_heads=2)
    autoencoder = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=32,
                                    latent_scale=0.7)
    clip = ClipTextConfig(width=32, layers=2, heads=4, mlp_width=37)
    return ModelParts(unet_config=unet, unet=randomised(UNetModel(unet), 1).state_dict(),
                      autoencoder_config=autoencoder,
                      autoencoder=randomised(AutoencoderKL(autoencoder), 2).state_dict(),
                      conditioning=ConditioningConfig(encoder="clip", clip=clip),
                      text_encoder=randomised(ClipTextTransformer(clip), 3).state_dict(),
                      sampling=SamplingConfig(sampler="ddim", steps=4), resolution=32)


@pytest.fixture
def bf16_math(monkeypatch, request):
    """Force the CPU's bf16 decision (the measured one depends on the machine)."""
    monkeypatch.setenv("LDM_CPU_BF16_MATH", request.param)
    cpu_bf16_math_pays.cache_clear()
    yield request.param == "1"
    cpu_bf16_math_pays.cache_clear()


def test_layerwise_casting_computes_in_fp32_with_bf16_weights_and_keeps_them_bf16():
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16),
                              torch.nn.SiLU(), torch.nn.Linear(16, 4))
    rounded = copy.deepcopy(net)  # the same weights rounded to bf16, computed in fp32
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    store_weights(net, torch.bfloat16, torch.float32)
    assert not net[0]._forward_pre_hooks  # the table is not cast: the rows it returns are
    x = torch.tensor([3, 1, 4])
    with torch.no_grad():
        out = net(x)
    assert out.dtype == torch.float32 and torch.equal(out, rounded(x).detach())
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())  # back to bf16 after the forward
    with pytest.raises(RuntimeError):
        net[1:](torch.randn(3, 5))  # a failing forward puts the bf16 weights back too
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())


@pytest.mark.parametrize("bf16_math", ["0", "1"], indirect=True)
def test_bf16_pipeline_keeps_bf16_weights_and_matches_fp32(bf16_math):
    parts = tiny_sd_parts()
    kwargs = dict(steps=3, guidance_scale=5.0, seed=0, num_images=2, progress=False)
    reference = Pipeline.from_parts(parts, device="cpu").generate_tensors("a red cube", **kwargs)
    pipe = Pipeline.from_parts(parts, device="cpu", precision="bf16")
    assert pipe.math == ("bf16" if bf16_math else "fp32")
    for module in (pipe.unet, pipe.autoencoder, pipe.conditioner.encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    images = pipe.generate_tensors("a red cube", **kwargs)
    difference = (images - reference).abs().max()
    # bf16 math rounds every activation too; fp32 math only the weights (measured: 0.12 and 0.023)
    assert images.dtype == torch.float32 and 0 < difference < (0.2 if bf16_math else 0.04)


def test_math_precision_follows_the_cpu_decision(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert math_precision("fp32", cpu) == "fp32" and math_precision("bf16", cuda) == "bf16"
    for forced, expected in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv("LDM_CPU_BF16_MATH", forced)
        cpu_bf16_math_pays.cache_clear()
        assert math_precision("bf16", cpu) == expected
    monkeypatch.setenv("LDM_CPU_BF16_MATH", "yes")
    cpu_bf16_math_pays.cache_clear()
    with pytest.raises(ValueError, match="LDM_CPU_BF16_MATH = 'yes': expected 1"):
        math_precision("bf16", cpu)
    monkeypatch.delenv("LDM_CPU_BF16_MATH")
    cpu_bf16_math_pays.cache_clear()
    assert isinstance(cpu_bf16_math_pays(), bool)  # measured
    cpu_bf16_math_pays.cache_clear()


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def test_free_heap_holes_go_back_to_the_system():
    if _malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")
    blocks = [torch.ones(16 * 1024) for _ in range(6400)]  # 64 KiB each, from the C heap: 400 MiB
    del blocks[::2]  # 200 MiB of holes between live blocks: freed, yet resident
    holding = _resident_mib()
    release_free_memory()
    assert holding - _resident_mib() > 100  # measured: 188 MiB
    assert all(torch.equal(b, torch.ones(16 * 1024)) for b in blocks)  # the live blocks are untouched
