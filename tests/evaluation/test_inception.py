"""The standard FID's Inception network against torch-fidelity's independent implementation (random weights,
same file), its TensorFlow-1 resize and its loading rules."""

import argparse
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from latent_diffusion.evaluation.inception import load_fid_inception, resize_like_tensorflow1
from latent_diffusion.files.weights import CheckpointError, save_weights

from conftest import random_inception_file


@pytest.fixture(scope="module")
def fidelity():
    """torch-fidelity's Inception module, imported without its package __init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity (test oracle) is not installed")
    saved = {k: v for k, v in sys.modules.items() if k.startswith("torch_fidelity")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        yield (importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
               importlib.import_module("torch_fidelity.interpolate_compat_tensorflow"))
    finally:
        for key in [k for k in sys.modules if k.startswith("torch_fidelity")]:
            del sys.modules[key]
        sys.modules.update(saved)


def test_tensorflow1_resize_matches_torch_fidelity(fidelity):
    _, interp = fidelity
    for size in (28, 32, 64):
        x = torch.rand(2, 3, size, size) * 255
        ours = resize_like_tensorflow1(x, 299)
        theirs = interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        assert ours.shape == (2, 3, 299, 299) and torch.allclose(ours, theirs, atol=1e-3)


def test_features_match_torch_fidelity(fidelity, tmp_path):
    extractor, _ = fidelity
    path = random_inception_file(tmp_path / "inception.pth")
    theirs = extractor.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                  feature_extractor_weights_path=str(path))
    ours = load_fid_inception(path)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = theirs(pixels)[0]
        got = ours(pixels.float() / 127.5 - 1)
    assert got.shape == (3, 2048) and expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    gray = torch.rand(2, 1, 28, 28) * 2 - 1  # grayscale: as if repeated to RGB
    with torch.no_grad():
        assert torch.equal(ours(gray), ours(gray.expand(-1, 3, -1, -1)))


def test_loading_rules(tmp_path):
    path = random_inception_file(tmp_path / "inception.pth")
    state = torch.load(path, weights_only=True)
    converted = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as converted files are
    save_weights(converted, tmp_path / "inception.safetensors")
    a, b = load_fid_inception(path), load_fid_inception(tmp_path / "inception.safetensors")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(CheckpointError, match="no such file"):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"model": argparse.Namespace(x=1)}, tmp_path / "code.pth")  # needs unpickling code: refused
    with pytest.raises(CheckpointError, match="not a plain tensor state dict"):
        load_fid_inception(tmp_path / "code.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_fid_inception(tmp_path / "partial.pth")
