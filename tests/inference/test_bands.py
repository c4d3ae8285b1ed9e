"""Row bands (`inference/bands.py`): the autoencoder encodes and decodes band by band what its plain forward gives."""

import copy

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL, Decoder, Encoder, PixelSpace, pixel_space_config
from latent_diffusion.inference.bands import RowBands, group_stats, inference_bands, norm_silu_rows, use_bands
from latent_diffusion.inference.precision import store_weights
from latent_diffusion.runtime import autocast

from conftest import randomised, tiny_autoencoder_config


def random_autoencoder(**config) -> AutoencoderKL:
    """A tiny autoencoder with every weight off its init (GroupNorm affines too: the bands' own norm is tested)."""
    return randomised(AutoencoderKL(tiny_autoencoder_config(**config)), 0)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bands_of_one_row_up_to_whole_layers_give_the_plain_forward(layout):
    """For bands of one row up to whole layers, with attention at a level, odd latent sizes and both memory formats."""
    model = random_autoencoder(ch_mult=(1, 2, 2), resolution=40, attn_resolutions=(20,)).to(memory_format=layout)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 24, generator=generator) * 2 - 1
    z = torch.randn(2, 4, 5, 7, generator=generator)
    with torch.no_grad():
        expected = model.encode(x).mean, model.decode(z)
        for elements in (1, 300, 5000, 1 << 30):  # one row per band, a few rows, whole layers
            use_bands(model, RowBands(elements))
            encoded, decoded = model.encode(x).mean, model.decode(z)
            assert decoded.shape == expected[1].shape and decoded.is_contiguous(memory_format=layout)
            torch.testing.assert_close(encoded, expected[0], rtol=0, atol=2e-5)
            torch.testing.assert_close(decoded, expected[1], rtol=0, atol=2e-5)


def test_bands_store_activations_in_bf16_with_fp32_math():
    """bf16 storage rounds the activations between layers, no more: the encoder hands `quant_conv` fp32 moments,
    the decoder returns the image in bf16."""
    model = random_autoencoder(resolution=32)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.encode(x).mean, model.decode(z)
        use_bands(model, RowBands(1000, storage=torch.bfloat16))
        encoded, decoded = model.encode(x).mean, model.decode(z)
    assert encoded.dtype == torch.float32 and decoded.dtype == torch.bfloat16
    assert 0 < relative_error(encoded, expected[0]) < 2e-2
    assert 0 < relative_error(decoded, expected[1]) < 2e-2


@pytest.mark.parametrize("math", ["fp32", "bf16"])
def test_bands_as_the_pipeline_runs_them_are_within_bf16_rounding_of_the_fp32_forward(math):
    """bf16 weights (`store_weights`), the math in fp32 (weights cast layer by layer) or bf16 (autocast), and
    `inference_bands` for the CPU, as `Pipeline` runs `--precision bf16`: within bf16's rounding of the fp32 forward
    of the same weights (bf16 math: or within twice the error of the plain forward at bf16 math, without bands,
    which reaches 3e-2 for some random weights)."""
    torch.manual_seed(0)
    model = random_autoencoder(ch_mult=(1, 2, 2), resolution=32, attn_resolutions=(16,))
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.data = p.data.bfloat16().float()
    plain = store_weights(copy.deepcopy(reference), torch.bfloat16, torch.bfloat16)
    store_weights(model, torch.bfloat16, torch.float32 if math == "fp32" else torch.bfloat16)
    use_bands(model, inference_bands(torch.device("cpu"), torch.bfloat16))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.encode(x).mean, reference.decode(z)
        with autocast(torch.device("cpu"), math):
            encoded, decoded = model.encode(x).mean, model.decode(z)
        with autocast(torch.device("cpu"), "bf16"):
            bf16_math = plain.encode(x).mean, plain.decode(z)
    assert decoded.dtype == torch.bfloat16
    for out, bf16_out, exact in zip((encoded, decoded), bf16_math, expected):
        bound = 2e-2 if math == "fp32" else max(2e-2, 2 * relative_error(bf16_out, exact))
        assert 0 < relative_error(out, exact) < bound


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_statistics_over_bands_are_the_whole_tensors(dtype, layout):
    """(mean, variance) per sample and group, over bands of one row up to the whole height, in two fp32 passes (fp32
    activations) or one pass of PyTorch's GroupNorm kernel per band (bf16): those of the whole tensor in fp64,
    for groups whose mean is several times their deviation."""
    norm = torch.nn.GroupNorm(4, 32, eps=1e-6)
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(2, 32, 1, 1, generator=generator) * 4
    x = (torch.randn(2, 32, 9, 7, generator=generator) + offsets).to(dtype).contiguous(memory_format=layout)
    exact = x.double().reshape(2, 4, -1)
    mean = exact.mean(-1)
    variance = exact.var(-1, unbiased=False)
    for rows in (1, 4, 9):
        stats = group_stats(x, norm, rows)
        assert all(s.dtype == torch.float32 and s.shape == (2, 4) for s in stats)
        torch.testing.assert_close(stats[0].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[1].double(), variance, rtol=1e-5, atol=0)


@pytest.mark.parametrize("math", ["fp32", "bf16"])
def test_norm_silu_rows_are_silu_of_group_norm(math):
    """rows(a, b) of bf16 activations: silu(GroupNorm(x)) of the whole tensor, sliced, in the math dtype (fp32, or
    bf16 under autocast: one rounding of the fp32 result)."""
    norm = randomised(torch.nn.GroupNorm(4, 32, eps=1e-6), 0)
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 32, 10, 6, generator=generator) * 2 + 1).bfloat16().contiguous(
        memory_format=torch.channels_last)
    expected = torch.nn.functional.silu(norm(x.float()))
    with torch.no_grad(), autocast(torch.device("cpu"), math):
        rows_of = norm_silu_rows(x, norm, 3)
        bands = [rows_of(a, min(a + 3, 10)) for a in range(0, 10, 3)]
    assert all(band.dtype == (torch.bfloat16 if math == "bf16" else torch.float32) for band in bands)
    tolerance = 1e-2 if math == "bf16" else 1e-5
    torch.testing.assert_close(torch.cat(bands, dim=2).float(), expected.detach(), rtol=tolerance, atol=tolerance)


def test_with_a_gradient_the_banded_autoencoder_runs_the_plain_forward():
    """Training is untouched: the same outputs and parameter gradients as the model never banded."""
    plain = random_autoencoder(resolution=32).train()
    banded = use_bands(copy.deepcopy(plain), RowBands(1000, storage=torch.bfloat16))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outputs = []
    for model in (plain, banded):
        image, posterior = model(x, sample_posterior=False)
        (image.square().mean() + posterior.kl().mean()).backward()
        outputs.append(image)
    assert outputs[1].dtype == torch.float32 and torch.equal(outputs[0], outputs[1])
    for (name, p), q in zip(plain.named_parameters(), banded.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad), name


def test_use_bands_keeps_the_parameters_and_the_state_dict():
    model = random_autoencoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = [p.data_ptr() for p in model.parameters()]
    use_bands(model, RowBands())
    assert isinstance(model.encoder, Encoder) and isinstance(model.decoder, Decoder)
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], v) for k, v in before.items())
    assert [p.data_ptr() for p in model.parameters()] == parameters
    AutoencoderKL(model.config).load_state_dict(state)  # strict: a plain autoencoder takes it as it is


def test_use_bands_on_what_has_no_encoder_and_decoder_is_a_clear_error():
    with pytest.raises(TypeError, match="not a PixelSpace"):
        use_bands(PixelSpace(pixel_space_config(3, 16)), RowBands())


def test_inference_bands_by_device_and_weight_dtype():
    """16 MiB fp32 bands on a CPU, 256 MiB on a GPU; activations stored in the weights' dtype when narrower."""
    assert inference_bands(torch.device("cpu"), torch.float32) == RowBands(1 << 22, storage=None)
    assert inference_bands(torch.device("cpu"), torch.bfloat16) == RowBands(1 << 22, storage=torch.bfloat16)
    assert inference_bands(torch.device("cuda"), torch.float16) == RowBands(1 << 26, storage=torch.float16)
