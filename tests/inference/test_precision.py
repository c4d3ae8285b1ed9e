"""Reduced-precision inference (`inference/precision.py`): bf16 weights (half the memory) with the math in bf16, or
in fp32 on CPUs without bf16 matrix units (layerwise casting), decided by rule or by LDM_CPU_BF16_MATH."""

import copy
import logging

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.conditioning import ClipTextTransformer
from latent_diffusion.config import AutoencoderConfig, ClipTextConfig, ConditioningConfig, SamplingConfig, UNetConfig
from latent_diffusion.formats.model import ModelParts
from latent_diffusion.inference import precision
from latent_diffusion.inference.precision import cpu_bf16_math, math_precision, store_weights
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.unet import UNetModel

from conftest import randomised

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AMX = {"avx512_f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True}
AVX512_BF16 = {"avx512_f": True, "avx512_bf16": True, "amx_tile": False, "amx_bf16": False, "vendor": "GenuineIntel"}
AMD_BF16 = {**AVX512_BF16, "vendor": "AuthenticAMD"}  # this CI host (Zen 4)


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


def test_bf16_math_with_amx_tiles_or_amds_avx512_bf16_and_not_intels_avx512_bf16_alone(monkeypatch):
    monkeypatch.delenv("LDM_CPU_BF16_MATH", raising=False)
    assert cpu_bf16_math(AMX) is True
    assert cpu_bf16_math(AMD_BF16) is True  # bf16 matmuls at 2.3x the fp32 rate (Zen 4)
    assert cpu_bf16_math(AVX512_BF16) is False  # at half the fp32 rate (an Intel Xeon without AMX)
    assert cpu_bf16_math({"avx2": True, "vendor": "AuthenticAMD"}) is False
    assert cpu_bf16_math({"architecture": "arm64", "bf16": True}) is False
    assert cpu_bf16_math({}) is False


def test_the_decision_does_not_depend_on_the_load(monkeypatch):
    """No timing: the same capabilities give the same decision, however busy the CPU (issue 19)."""
    monkeypatch.delenv("LDM_CPU_BF16_MATH", raising=False)
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: AVX512_BF16)
    assert {math_precision("bf16", CPU) for _ in range(3)} == {"fp32"}
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: AMX)
    assert math_precision("bf16", CPU) == "bf16"


def test_the_environment_variable_decides_over_the_rule(monkeypatch):
    for forced, capabilities, expected in (("1", AVX512_BF16, True), ("0", AMX, False)):
        monkeypatch.setenv("LDM_CPU_BF16_MATH", forced)
        assert cpu_bf16_math(capabilities) is expected
    monkeypatch.setenv("LDM_CPU_BF16_MATH", "yes")
    with pytest.raises(ValueError, match="LDM_CPU_BF16_MATH = 'yes': expected 1"):
        math_precision("bf16", CPU)


def test_math_precision_changes_only_bf16_on_a_cpu(monkeypatch):
    monkeypatch.setenv("LDM_CPU_BF16_MATH", "0")
    assert math_precision("fp32", CPU) == "fp32" and math_precision("bf16", CPU) == "fp32"
    assert math_precision("bf16", CUDA) == "bf16" and math_precision("fp16", CUDA) == "fp16"


def test_the_decision_is_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("LDM_CPU_BF16_MATH", "1")
    precision._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        for _ in range(3):
            math_precision("bf16", CPU)
    assert [r.getMessage() for r in caplog.records] == ["bf16 weights compute in bf16 on the CPU "
                                                        "(LDM_CPU_BF16_MATH=1)"]


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


@pytest.mark.parametrize("bf16_math", ["0", "1"])
def test_bf16_pipeline_keeps_bf16_weights_and_matches_fp32(bf16_math, monkeypatch):
    monkeypatch.setenv("LDM_CPU_BF16_MATH", bf16_math)
    parts = tiny_sd_parts()
    kwargs = dict(steps=3, guidance_scale=5.0, seed=0, num_images=2, progress=False)
    reference = Pipeline.from_parts(parts, device="cpu").generate_tensors("a red cube", **kwargs)
    pipe = Pipeline.from_parts(parts, device="cpu", precision="bf16")
    assert pipe.math == ("bf16" if bf16_math == "1" else "fp32")
    for module in (pipe.unet, pipe.autoencoder, pipe.conditioner.encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    images = pipe.generate_tensors("a red cube", **kwargs)
    difference = (images - reference).abs().max()
    # bf16 math rounds every activation too; fp32 math only the weights (measured: 0.12 and 0.023)
    assert images.dtype == torch.float32 and 0 < difference < (0.2 if bf16_math == "1" else 0.04)
