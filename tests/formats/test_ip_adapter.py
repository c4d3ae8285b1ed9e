"""IP-Adapter files in the released layouts (`.bin`: torch.save of {"image_proj", "ip_adapter"}; `.safetensors`:
flat prefixed keys) read alike; an image prompt loaded from one conditions our UNet exactly as diffusers' pipeline
(`load_ip_adapter`, `prepare_ip_adapter_image_embeds`) conditions its own, from PIL image to UNet output, the null
image prompt included; files of another model or kind are one clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.ip_adapter import IPAdapterError, load_image_prompt, read_ip_adapter
from latent_diffusion.conditioning.image_prompt import cross_attention_layers, detach_ip_adapter

from conditioning.test_image_prompt import (KINDS, diffusers_cross_attention, diffusers_unet, ip_adapter_state, photo,
                                            tiny_sd, unet_inputs, write_image_encoder)
from conftest import TINY_SD1
from formats.test_lora import diffusers_pipe

transformers = pytest.importorskip("transformers")

__all__ = ["tiny_sd"]  # the fixture, shared with the module-level tests
TOLERANCE = 1e-5
CONTEXT_DIM = TINY_SD1[0].context_dim


def write_ip_adapter(state: dict, path):
    """`state` as released: torch.save of the two dicts (.bin), or flat `part.key` tensors (.safetensors)."""
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({f"{part}.{key}": value for part, tensors in state.items() for key, value in tensors.items()}, path)
    return path


@pytest.fixture(scope="module")
def widths(tiny_sd):
    return diffusers_cross_attention(diffusers_unet(tiny_sd[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_both_layouts_read_alike(tmp_path, widths, kind):
    state = ip_adapter_state(kind, widths, CONTEXT_DIM)
    files = [read_ip_adapter(write_ip_adapter(state, tmp_path / f"ip{suffix}")) for suffix in (".bin", ".safetensors")]
    for file in files:
        assert file.kind == kind
        for part in ("image_proj", "ip_adapter"):
            got = getattr(file, part)
            assert got.keys() == state[part].keys() and all(torch.equal(got[k], state[part][k]) for k in got)


@pytest.mark.parametrize("kind, suffix", [("ip-adapter", ".bin"), ("ip-adapter-plus", ".safetensors")])
def test_image_prompt_conditions_the_unet_as_diffusers(tiny_sd, tmp_path, widths, kind, suffix):
    unet, folder = tiny_sd
    path = write_ip_adapter(ip_adapter_state(kind, widths, CONTEXT_DIM, seed=8), tmp_path / f"ip-adapter{suffix}")
    encoder_folder = write_image_encoder(tmp_path / "image_encoder", seed=2)
    pipe = diffusers_pipe(folder)
    pipe.image_encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(encoder_folder).eval()
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(0.6)
    image = photo(45, 37, seed=3)
    x, t, context = unet_inputs()
    prompt = load_image_prompt(path, encoder_folder, unet, scale=0.6)
    try:
        with torch.no_grad():
            embeds = pipe.prepare_ip_adapter_image_embeds([image], None, "cpu", 1, True)  # [∅, image]
            expected_tokens = pipe.unet.encoder_hid_proj(embeds)[0][:, 0]
            expected = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": embeds}).sample
            tokens = torch.cat([prompt.unconditional(1), prompt.tokens([image])])
            ours = unet(x, t, context, extra_context={prompt.name: tokens})
    finally:
        detach_ip_adapter(unet)
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(ours, expected, rtol=0, atol=TOLERANCE)


def test_adapter_for_another_model_is_a_clear_error(tiny_sd, tmp_path, widths):
    unet, _ = tiny_sd
    encoder_folder = write_image_encoder(tmp_path / "image_encoder")
    wider = write_ip_adapter(ip_adapter_state("ip-adapter", widths, 1024), tmp_path / "sd2.safetensors")
    with pytest.raises(IPAdapterError, match=r"image tokens are 1024 wide \(SD 2\.x.*reads 64.*another model"):
        load_image_prompt(wider, encoder_folder, unet)
    fewer = write_ip_adapter(ip_adapter_state("ip-adapter", widths[:3], CONTEXT_DIM), tmp_path / "other.bin")
    with pytest.raises(IPAdapterError, match="numbered for 3 cross-attention layers.*this UNet has 7"):
        load_image_prompt(fewer, encoder_folder, unet)
    assert not any(layer.streams for _, layer in cross_attention_layers(unet))


class _Code:
    """An object whose unpickling would import and run code: refused, never executed."""


@pytest.mark.parametrize("contents, message", [
    ({"image_proj.proj.weight": torch.zeros(1), "unet.conv.weight": torch.zeros(1)}, r"keys outside image_proj"),
    ({"image_proj.proj.0.weight": torch.zeros(1), "image_proj.proj.3.weight": torch.zeros(1),
      "ip_adapter.1.to_k_ip.weight": torch.zeros(1)}, "IP-Adapter Full Face.*supported are"),
    ({"ip_adapter.1.to_k_ip.weight": torch.zeros(1)}, "'image_proj' holds no named tensors"),
])
def test_other_files_are_clear_errors(tmp_path, contents, message):
    path = tmp_path / "file.safetensors"
    save_file(contents, path)
    with pytest.raises(IPAdapterError, match=message):
        read_ip_adapter(path)


def test_pickles_that_run_code_and_other_suffixes_are_refused(tmp_path):
    torch.save({"image_proj": {"proj.weight": _Code()}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_ip_adapter(tmp_path / "evil.bin")
    (tmp_path / "ip.txt").write_text("hello")
    with pytest.raises(IPAdapterError, match=r"expected a \.safetensors file"):
        read_ip_adapter(tmp_path / "ip.txt")
