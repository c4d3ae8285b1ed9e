"""Convolutions computed another way (`inference/conv.py`): each equals the plain convolution it replaces."""

import pytest
import torch
import torch.nn.functional as F

from latent_diffusion.inference import conv


@pytest.mark.parametrize("shape,bias", [((2, 6, 4, 5), True), ((1, 3, 1, 7), False), ((3, 5, 6, 6), True)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("weights_first", [0, 1 << 20])
def test_convolution_as_one_matmul_equals_the_direct_one(shape, bias, stride, layout, weights_first, monkeypatch):
    """NCHW, and channels-last (input and weights: the product in their memory order, the weights or the windows
    as its first operand by the output's pixels), out in the input's layout."""
    monkeypatch.setattr(conv, "NHWC_WEIGHTS_FIRST_PIXELS", weights_first)
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=layout)
    weight = torch.randn(7, shape[1], 3, 3).contiguous(memory_format=layout)
    b = torch.randn(7) if bias else None
    expected = F.conv2d(x, weight, b, stride=stride, padding=1)
    got = conv.conv3x3_as_matmul(x, weight, b, stride)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsampled_convolution_equals_upsampling_then_convolving(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
    weight, bias = torch.randn(4, 6, 3, 3), torch.randn(4)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    got = conv.upsampled_conv3x3(x, weight, bias)
    assert got.shape == (2, 4, 10, 14) and got.is_contiguous(memory_format=layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(conv.upsampled_conv3x3(x, weight, None), expected - bias[:, None, None], rtol=0,
                               atol=2e-5)
    # bands of input rows [r0, r1), read with a row of halo where they do not touch the border, written in bf16
    out = torch.empty(2, 4, 10, 14, dtype=torch.bfloat16)
    for r0, r1 in [(0, 1), (1, 3), (3, 4), (4, 5)]:
        band = x[:, :, max(r0 - 1, 0):r1 + 1]
        conv.upsampled_conv3x3(band, weight, bias, padding=(int(r0 == 0), int(r1 == 5)), out=out[:, :, 2 * r0:2 * r1])
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsampled_convolution_of_few_pixels_as_matmuls_equals_upsampling_then_convolving(layout, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
    weight, bias = torch.randn(4, 6, 3, 3), torch.randn(4)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    calls = []
    phases_as_matmuls = conv.phases_as_matmuls
    monkeypatch.setattr(conv, "phases_as_matmuls", lambda *a: calls.append(1) or phases_as_matmuls(*a))
    conv.upsampled_conv3x3(x, weight, bias)
    assert not calls  # small weights: one convolution by oneDNN
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHTS", 0)
    torch.testing.assert_close(conv.upsampled_conv3x3(x, weight, bias), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(conv.upsampled_conv3x3(x, weight, None), expected - bias[:, None, None], rtol=0,
                               atol=2e-5)
    assert len(calls) == 2
    monkeypatch.setattr(conv, "MATMUL_MAX_PIXELS", x[:, 0].numel() - 1)
    conv.upsampled_conv3x3(x, weight, bias)
    assert len(calls) == 2  # too many pixels
