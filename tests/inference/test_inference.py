"""The inference layer's entry point (`prepare_for_inference`), and the networks' independence from it: the model
files define the networks once, and know nothing of the techniques applied to them from outside."""

import copy
import re
from pathlib import Path

import torch

import latent_diffusion
from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.inference import prepare_for_inference
from latent_diffusion.inference.bands import BandedDecoder, BandedEncoder

from conftest import randomised, tiny_autoencoder_config

NETWORK_FILES = ("unet.py", "nn", "autoencoder")
INFERENCE_WORDS = re.compile(r"latent_diffusion\.inference|from latent_diffusion import inference|\bbands?\b"
                             r"|cast_as_one|repeat_batch|eager_cpu_inference|inference_bands", re.IGNORECASE)


def test_network_files_know_nothing_of_the_inference_layer():
    package = Path(latent_diffusion.__file__).parent
    files = [file for name in NETWORK_FILES for file in
             ([package / name] if name.endswith(".py") else sorted((package / name).rglob("*.py")))]
    assert len(files) > 5
    found = [f"{file.relative_to(package)}:{number}: {line.strip()}" for file in files
             for number, line in enumerate(file.read_text().splitlines(), 1) if INFERENCE_WORDS.search(line)]
    assert not found, "\n".join(found)


def test_a_prepared_autoencoder_runs_channels_last_in_bands_with_its_state_dict_and_outputs():
    plain = randomised(AutoencoderKL(tiny_autoencoder_config(ch_mult=(1, 2), resolution=32)), 0)
    prepared = prepare_for_inference(copy.deepcopy(plain), torch.device("cpu"))
    assert (type(prepared.encoder), type(prepared.decoder)) == (BandedEncoder, BandedDecoder)
    assert prepared.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(prepared.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        for got, expected in ((prepared.encode(x).mean, plain.encode(x).mean),
                              (prepared.decode(plain.encode(x).mean), plain.decode(plain.encode(x).mean))):
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_prepared_weights_are_stored_narrower_and_computed_at_the_math_dtype():
    plain = randomised(AutoencoderKL(tiny_autoencoder_config(resolution=32)), 0)
    prepared = prepare_for_inference(copy.deepcopy(plain), torch.device("cpu"), torch.bfloat16, torch.float32)
    assert {p.dtype for p in prepared.parameters()} == {torch.bfloat16}
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        decoded, expected = prepared.decode(z), plain.decode(z)
    assert decoded.dtype == torch.bfloat16  # activations stored in bf16 between the layers (`bands.py`)
    assert 0 < ((decoded.float() - expected).abs().max() / expected.abs().max()).item() < 2e-2
    assert {p.dtype for p in prepared.parameters()} == {torch.bfloat16}
