"""Data-parallel training: 2 gloo processes under torchrun (DDP, and FSDP with a resume) follow the 1-process
trajectory; gradient accumulation too; gradient checkpointing; bf16."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from latent_diffusion.cli import main
from latent_diffusion.config import ConfigError, SamplingConfig, TrainConfig, save_config
from latent_diffusion.files.weights import load_weights
from latent_diffusion.training.distributed import DistributedContext, micro_batches, rank_chunks

from conftest import randomised, subprocess_env, tiny_ldm_config


def _config(tmp_path, autoencoder_run, name, **training):
    # A small learning rate: Adam normalises the first, near-zero gradients of zero-initialised layers, so
    # rounding-level differences in summation order grow in proportion to it.
    cfg = tiny_ldm_config(autoencoder_run, max_steps=4, batch_size=8, checkpoint_every=4, log_every=1,
                          learning_rate=1e-4, **training)
    cfg = replace(cfg, sampling=SamplingConfig())
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path


def _unet_weights(run):
    return {k: v for k, v in load_weights(run / "checkpoints" / "last.safetensors").items() if k.startswith("unet.")}


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_global_batch_is_split_the_same_at_every_world_size():
    cfg = TrainConfig(batch_size=8, micro_batch_size=2)
    assert micro_batches(cfg, 1) == (8, 4) and micro_batches(cfg, 2) == (4, 2)
    parts = [rank_chunks(8, DistributedContext(rank=r, world_size=2), 2) for r in range(2)]
    assert parts == [[slice(0, 2), slice(2, 4)], [slice(4, 6), slice(6, 8)]]
    with pytest.raises(ConfigError, match="batch_size = 8: expected a multiple of the world size 3"):
        micro_batches(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch_size = 3: expected a divisor of the per-rank batch 8"):
        micro_batches(TrainConfig(batch_size=8, micro_batch_size=3), 1)


def test_two_process_torchrun_ddp_and_fsdp_equal_one_process(tmp_path, shapes_folder, autoencoder_run):
    single, accumulated, ddp = tmp_path / "single", tmp_path / "accumulated", tmp_path / "ddp"
    config = _config(tmp_path, autoencoder_run, "plain")
    assert main(["train", "--config", str(config), "--data", str(shapes_folder), "--out", str(single),
                 "--device", "cpu"]) == 0
    assert main(["train", "--config", str(_config(tmp_path, autoencoder_run, "micro", micro_batch_size=2)),
                 "--data", str(shapes_folder), "--out", str(accumulated), "--device", "cpu"]) == 0
    env = subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "latent_diffusion.cli", "train", "--config", str(config), "--data", str(shapes_folder),
         "--out", str(ddp), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = _unet_weights(single)
    assert _max_difference(reference, _unet_weights(accumulated)) < 1e-5
    assert _max_difference(reference, _unet_weights(ddp)) < 1e-5
    assert not torch.equal(reference["unet.out.2.weight"], torch.zeros_like(reference["unet.out.2.weight"]))
    fsdp_config = _config(tmp_path, autoencoder_run, "fsdp", strategy="fsdp")
    for max_steps in (2, 4):  # the second run resumes the sharded run from its (whole-tensor) checkpoint
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "latent_diffusion.cli", "train", "--config", str(fsdp_config), "--data", str(shapes_folder),
             "--out", str(tmp_path / "fsdp"), "--device", "cpu", "--set", f"training.max_steps={max_steps}"],
            env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert _max_difference(reference, _unet_weights(tmp_path / "fsdp")) < 1e-5
    shards = sorted(p.name for p in (ddp / "cache").glob("latents-*.safetensors"))
    assert shards == ["latents-00000-of-00002.safetensors", "latents-00001-of-00002.safetensors"]


def test_gradient_checkpointing_gives_the_same_gradients():
    from latent_diffusion.config import UNetConfig
    from latent_diffusion.unet import UNetModel

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = UNetModel(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(2,), num_heads=2, context_dim=8, norm_groups=8,
                                    gradient_checkpointing=checkpointing))
        randomised(unet, 2).train()  # the zero-initialised output would hide differences
        x, context = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.ones(2, 3, 8)
        unet(x, torch.tensor([10.0, 500.0]), context=context).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert grads[0]["input_blocks.0.0.weight"].abs().sum() > 0


def test_bf16_autocast_training_runs_on_the_cpu(tmp_path, shapes_folder, autoencoder_run):
    run = tmp_path / "bf16"
    config = _config(tmp_path, autoencoder_run, "bf16", precision="bf16")
    assert main(["train", "--config", str(config), "--data", str(shapes_folder), "--out", str(run),
                 "--device", "cpu"]) == 0
    weights = _unet_weights(run)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
