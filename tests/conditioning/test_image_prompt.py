"""IP-Adapter at module level: CLIP preprocessing as transformers' CLIPImageProcessor, the released projections as
diffusers' `ImageProjection` / `IPAdapterPlusImageProjection`, decoupled cross-attention in diffusers' layer order
(scale 0 and detach give the plain UNet back), and clear errors for weights of another model.

The helpers build what a released IP-Adapter holds from random numbers, shaped and numbered by diffusers' own UNet
(`ip_adapter_state`), and a tiny CLIP image encoder folder (`write_image_encoder`); the pipeline tests reuse them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latent_diffusion.conditioning.image_prompt import (ImagePrompt, Resampler, attach_ip_adapter, clip_pixels,
                                                        cross_attention_layers, detach_ip_adapter, image_projection,
                                                        load_image_encoder, projection_kind, set_ip_adapter_scale)
from latent_diffusion.files.weights import CheckpointError, load_weights
from latent_diffusion.formats.diffusers_format import write_diffusers
from latent_diffusion.unet import UNetModel

from conftest import TINY_SD1, tiny_original_parts

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
TINY_VISION = dict(hidden_size=32, projection_dim=32, image_size=32, patch_size=8, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=64)
KINDS = ("ip-adapter", "ip-adapter-plus")


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A photo-like image: smooth colour gradients, a bright disc and fine noise (edges for bicubic to ring on)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 1 - (x + y) / 2], -1) * 200 + rng.normal(0, 12, (height, width, 3))
    rgb[(x - 0.4) ** 2 + (y - 0.3) ** 2 < 0.02] = 250
    channels = [np.clip(rgb, 0, 255).astype(np.uint8)]
    if mode == "RGBA":
        channels.append((x * 255).astype(np.uint8)[..., None])
    return Image.fromarray(np.concatenate(channels, -1), mode)


def write_image_encoder(folder, seed: int = 0, **changes):
    """A random tiny `CLIPVisionModelWithProjection` saved as IP-Adapter ships `image_encoder/` (config.json +
    model.safetensors)."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**TINY_VISION, **changes})
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def diffusers_cross_attention(unet) -> list[int]:
    """The widths of diffusers' cross-attention layers in `attn_processors` order: the order a file numbers them."""
    names = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [unet.get_submodule(n).to_k.out_features for n in names]


def ip_adapter_state(kind: str, widths: list[int], context_dim: int, embed_dim: int = 32, seed: int = 0,
                     depth: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter in the released layout: `image_proj` (4 tokens from the image embedding, or a Resampler
    of 4 queries over the hidden states) and `ip_adapter.{1, 3, ...}.to_k_ip/to_v_ip` for layers of `widths`."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, offset=0.0):
        return torch.randn(shape, generator=generator) * scale + offset

    if kind == "ip-adapter":
        image_proj = {"proj.weight": rand(4 * context_dim, embed_dim), "proj.bias": rand(4 * context_dim),
                      "norm.weight": rand(context_dim, offset=1.0), "norm.bias": rand(context_dim)}
    else:
        dim, inner = 32, 64  # one 64-wide head; depth 4 as released (diffusers builds 4 layers whatever the file)
        image_proj = {"latents": rand(1, 4, dim, scale=1.0), "proj_in.weight": rand(dim, embed_dim),
                      "proj_in.bias": rand(dim), "proj_out.weight": rand(context_dim, dim),
                      "proj_out.bias": rand(context_dim), "norm_out.weight": rand(context_dim, offset=1.0),
                      "norm_out.bias": rand(context_dim)}
        for i in range(depth):
            image_proj.update({
                f"layers.{i}.0.norm1.weight": rand(dim, offset=1.0), f"layers.{i}.0.norm1.bias": rand(dim),
                f"layers.{i}.0.norm2.weight": rand(dim, offset=1.0), f"layers.{i}.0.norm2.bias": rand(dim),
                f"layers.{i}.0.to_q.weight": rand(inner, dim), f"layers.{i}.0.to_kv.weight": rand(2 * inner, dim),
                f"layers.{i}.0.to_out.weight": rand(dim, inner),
                f"layers.{i}.1.0.weight": rand(dim, offset=1.0), f"layers.{i}.1.0.bias": rand(dim),
                f"layers.{i}.1.1.weight": rand(4 * dim, dim), f"layers.{i}.1.3.weight": rand(dim, 4 * dim)})
    ip_adapter = {}
    for i, width in enumerate(widths):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = rand(width, context_dim)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = rand(width, context_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(our UNet, the diffusers folder of the same random tiny SD 1.x model)."""
    parts = tiny_original_parts(TINY_SD1, resolution=32)
    folder = tmp_path_factory.mktemp("tiny_sd")
    write_diffusers(parts, folder)
    unet = UNetModel(parts.unet_config)
    unet.load_state_dict(parts.unet)
    return unet.eval(), folder


def diffusers_unet(folder):
    return diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()


def unet_inputs(batch: int = 2, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([3.0, 917.0][:batch]),
            torch.randn(batch, 5, TINY_SD1[0].context_dim, generator=generator))


# --- preprocessing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, width, height, mode", [(224, 317, 251, "RGB"), (224, 181, 300, "RGBA"),
                                                       (32, 97, 41, "RGB")])
def test_preprocessing_is_clip_image_processor(size, width, height, mode):
    processor = transformers.CLIPImageProcessorPil(size=size, crop_size=size)  # as diffusers' load_ip_adapter
    images = [photo(width, height, mode, seed=1), photo(height, width, mode, seed=2)]
    expected = processor(images, return_tensors="pt").pixel_values
    ours = clip_pixels(images, size)
    assert ours.shape == expected.shape == (2, 3, size, size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=TOLERANCE)


def test_preprocessing_wants_a_list_of_images():
    with pytest.raises(ValueError, match="images: expected a non-empty list of PIL images"):
        clip_pixels(torch.zeros(1, 3, 32, 32), 32)


# --- the projections ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_diffusers(tiny_sd, kind):
    _, folder = tiny_sd
    theirs = diffusers_unet(folder)
    state = ip_adapter_state(kind, diffusers_cross_attention(theirs), TINY_SD1[0].context_dim)
    theirs._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    ours = image_projection(state["image_proj"])
    features = torch.randn((3, 32) if kind == "ip-adapter" else (3, 17, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs.encoder_hid_proj([features[:, None]])[0][:, 0]
        torch.testing.assert_close(ours(features), expected, rtol=0, atol=TOLERANCE)
    assert projection_kind(state["image_proj"]) == kind and isinstance(ours, Resampler) == (kind != "ip-adapter")


def test_unsupported_projection_is_named():
    with pytest.raises(ValueError, match="IP-Adapter Full Face"):
        projection_kind({"proj.0.weight": torch.zeros(1), "proj.3.weight": torch.zeros(1)})


# --- decoupled cross-attention ------------------------------------------------------------------------------------

def test_layers_are_numbered_as_diffusers(tiny_sd):
    unet, folder = tiny_sd
    ours = [name for name, _ in cross_attention_layers(unet)]
    assert ours[0].startswith("input_blocks") and ours[-1].startswith("middle_block")  # mid last, as diffusers
    assert [layer.to_k.out_features for _, layer in cross_attention_layers(unet)] == \
        diffusers_cross_attention(diffusers_unet(folder))


@pytest.mark.parametrize("kind", KINDS)
def test_unet_with_image_tokens_is_diffusers(tiny_sd, tmp_path, kind):
    unet, folder = tiny_sd
    theirs = diffusers_unet(folder)
    state = ip_adapter_state(kind, diffusers_cross_attention(theirs), TINY_SD1[0].context_dim, seed=4)
    theirs._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    for processor in theirs.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.7]
    encoder = load_image_encoder(write_image_encoder(tmp_path / "image_encoder"))
    prompt = ImagePrompt(encoder, image_projection(state["image_proj"]))
    attach_ip_adapter(unet, state["ip_adapter"], scale=0.7)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    x, t, context = unet_inputs()
    try:
        with torch.no_grad():
            output = encoder(pixels, output_hidden_states=True)
            features = output.hidden_states[-2] if kind != "ip-adapter" else output.image_embeds
            expected = theirs(x, t, encoder_hidden_states=context,
                              added_cond_kwargs={"image_embeds": [features[:, None]]}).sample
            ours = unet(x, t, context, extra_context={"ip_adapter": prompt.tokens(pixels)})
            plain = unet(x, t, context)
    finally:
        detach_ip_adapter(unet)
    torch.testing.assert_close(ours, expected, rtol=0, atol=TOLERANCE)
    assert (ours - plain).abs().max() > 1e-2  # the image tokens do change the output


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_is_diffusers_negative(tiny_sd, tmp_path, kind):
    """∅: the projection of a zero embedding (IP-Adapter) or of a zero image's hidden states (Plus)."""
    encoder = load_image_encoder(write_image_encoder(tmp_path / "image_encoder"))
    state = ip_adapter_state(kind, [], TINY_SD1[0].context_dim)
    prompt = ImagePrompt(encoder, image_projection(state["image_proj"]))
    with torch.no_grad():
        if kind == "ip-adapter":
            negative = torch.zeros(1, TINY_VISION["projection_dim"])
        else:
            negative = encoder(torch.zeros(1, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
        expected = prompt.projection(negative).expand(3, -1, -1)
    torch.testing.assert_close(prompt.unconditional(3), expected, rtol=0, atol=0)


def test_scale_zero_and_detach_give_the_plain_unet(tiny_sd):
    unet, folder = tiny_sd
    state = ip_adapter_state("ip-adapter", diffusers_cross_attention(diffusers_unet(folder)), TINY_SD1[0].context_dim)
    x, t, context = unet_inputs()
    tokens = torch.randn(2, 4, TINY_SD1[0].context_dim)
    with torch.no_grad():
        plain = unet(x, t, context)
        attach_ip_adapter(unet, state["ip_adapter"], scale=1.0, name="image")
        try:
            assert not torch.equal(unet(x, t, context, extra_context={"image": tokens}), plain)
            set_ip_adapter_scale(unet, 0.0, name="image")
            assert torch.equal(unet(x, t, context, extra_context={"image": tokens}), plain)
        finally:
            detach_ip_adapter(unet, name="image")
        assert torch.equal(unet(x, t, context, extra_context={"image": tokens}), plain)
    assert not any(layer.streams for _, layer in cross_attention_layers(unet))


def test_weights_for_another_width_are_a_clear_error(tiny_sd):
    unet, folder = tiny_sd
    widths = diffusers_cross_attention(diffusers_unet(folder))
    wider = ip_adapter_state("ip-adapter", widths, context_dim=TINY_SD1[0].context_dim * 2)["ip_adapter"]
    with pytest.raises(ValueError, match=r"ip_adapter\.1\.to_k_ip\.weight is of shape \(32, 128\).*another model"):
        attach_ip_adapter(unet, wider)
    fewer = ip_adapter_state("ip-adapter", widths[:-1], TINY_SD1[0].context_dim)["ip_adapter"]
    with pytest.raises(ValueError, match="numbered for 6 cross-attention layers.*this UNet has 7"):
        attach_ip_adapter(unet, fewer)
    assert not any(layer.streams for _, layer in cross_attention_layers(unet))  # nothing half attached


def test_encoder_of_another_width_is_a_clear_error(tmp_path):
    encoder = load_image_encoder(write_image_encoder(tmp_path / "image_encoder", projection_dim=16))
    projection = image_projection(ip_adapter_state("ip-adapter", [], 64)["image_proj"])
    with pytest.raises(ValueError, match="reads image embeddings 32 wide, but the image encoder's are 16 wide"):
        ImagePrompt(encoder, projection)


def test_encoder_reads_a_file_with_its_config(tmp_path):
    folder = write_image_encoder(tmp_path / "image_encoder")
    (tmp_path / "clip.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = load_image_encoder(folder)(pixels).image_embeds
        ours = load_image_encoder(tmp_path / "clip.safetensors", config=folder / "config.json")(pixels).image_embeds
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="its config .*config.json is missing"):
        load_image_encoder(tmp_path / "clip.safetensors")


def test_encoder_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    folder = write_image_encoder(tmp_path / "image_encoder")
    tensors = load_weights(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("visual_projection")}, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="does not fit a CLIPVisionModelWithProjection.*visual_projection"):
        load_image_encoder(tmp_path / "cut.safetensors", config=folder / "config.json")
