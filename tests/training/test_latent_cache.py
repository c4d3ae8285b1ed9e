"""The latent cache: worker processes (training.num_workers) load the images without changing what is cached, and a stop
while caching keeps the encoded part for the next run."""

import pytest
import torch

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.data import ImageFolder
from latent_diffusion.files.weights import load_weights
from latent_diffusion.training.faults import StopRequested
from latent_diffusion.training.latent_cache import encode_dataset, partial_path

from conftest import tiny_autoencoder_config


def test_worker_processes_encode_the_same_cache(tmp_path, shapes_folder):
    torch.manual_seed(0)
    autoencoder, dataset = AutoencoderKL(tiny_autoencoder_config()).eval(), ImageFolder(shapes_folder, 16)
    alone = encode_dataset(autoencoder, dataset, tmp_path / "alone", batch_size=5, progress=False)
    workers = encode_dataset(autoencoder, dataset, tmp_path / "workers", batch_size=5, progress=False, num_workers=2)
    assert torch.equal(alone.mean, workers.mean) and torch.equal(alone.std, workers.std)
    assert alone.captions == workers.captions and len(alone) == len(dataset)


class _StopAfter:
    """A stand-in for `StopSignals` whose stop arrives once `count` batches have been encoded."""

    def __init__(self, count):
        self.count, self.requested = count, None

    def check(self, step=0):
        if self.requested is not None:
            raise StopRequested(self.requested, step)

    def tick(self, *args):
        self.count -= 1
        if self.count == 0:
            self.requested = "SIGTERM"


def test_a_stop_while_caching_latents_keeps_the_encoded_part_and_the_next_run_continues(tmp_path, shapes_folder):
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(tiny_autoencoder_config()).eval()
    dataset = ImageFolder(shapes_folder, 16)
    whole = encode_dataset(autoencoder, dataset, tmp_path / "whole", batch_size=5, progress=False)
    stop = _StopAfter(2)
    hook = autoencoder.encoder.register_forward_hook(stop.tick)
    with pytest.raises(StopRequested):
        encode_dataset(autoencoder, dataset, tmp_path / "cache", batch_size=5, progress=False, signals=stop)
    hook.remove()
    partial = partial_path(tmp_path / "cache" / "latents.safetensors")
    assert load_weights(partial)["mean"].shape[0] == 10  # the two batches done are kept
    calls = []
    hook = autoencoder.encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    resumed = encode_dataset(autoencoder, dataset, tmp_path / "cache", batch_size=5, progress=False)
    hook.remove()
    assert sum(calls) == len(dataset) - 10 and not partial.exists()  # only the rest was encoded
    assert torch.allclose(resumed.mean, whole.mean, atol=1e-6) and resumed.captions == whole.captions
