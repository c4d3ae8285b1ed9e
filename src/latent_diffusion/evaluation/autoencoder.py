"""Reconstruction quality and latent statistics of a trained autoencoder; calibrates the latent scale."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.config import save_config
from latent_diffusion.data import open_dataset
from latent_diffusion.evaluation.features import FeatureNet, extract, load_feature_net
from latent_diffusion.evaluation.fid import fid
from latent_diffusion.evaluation.metrics import psnr, ssim
from latent_diffusion.files.atomic import atomic_write_bytes, check_writable
from latent_diffusion.formats.autoencoder import CONFIG_FILE, load_autoencoder
from latent_diffusion.inference import prepare_for_inference
from latent_diffusion.runtime import resolve_device
from latent_diffusion.training.grids import write_reconstruction_grid


@torch.no_grad()
def evaluate_reconstruction(model: AutoencoderKL, dataset: Dataset, num_images: int | None = None,
                            batch_size: int = 64, seed: int = 0, progress: bool = True,
                            features: FeatureNet | None = None) -> dict:
    """PSNR/SSIM of mode() reconstructions, statistics of posterior samples z ~ q(z|x), and with a feature
    network the reconstruction FID (rFID: reconstructions against their originals)."""
    if num_images is not None and num_images < len(dataset):
        dataset = Subset(dataset, range(num_images))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    psnrs, ssims, latents, real, fake = [], [], [], [], []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="eval", disable=not progress):
        x = batch["image"].to(device)
        posterior = model.encode(x)
        x_rec = model.decode(posterior.mode())
        psnrs.append(psnr(x, x_rec).cpu())
        ssims.append(ssim(x, x_rec).cpu())
        latents.append(posterior.sample(generator).float().cpu())
        if features is not None:
            real.append(extract(features, x.float().cpu())[0])
            fake.append(extract(features, x_rec.float().cpu())[0])
    z = torch.cat(latents)
    std = z.flatten().std().item()
    figures = {
        "num_images": len(dataset),
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
        "latent_shape": list(z.shape[1:]),
        "latent_mean": z.mean().item(),
        "latent_std": std,
        "latent_channel_std": z.transpose(0, 1).flatten(1).std(dim=1).tolist(),
        "latent_scale": 1.0 / std,
    }
    if features is not None:
        figures["rfid"] = fid(torch.cat(fake), torch.cat(real))
    return figures


def evaluate_autoencoder_run(run_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                             split: str = "test", num_images: int | None = None, batch_size: int = 64,
                             device: str = "auto", write_scale: bool = False, progress: bool = True,
                             features: str | os.PathLike | None = None) -> dict:
    """Evaluate a run folder on `data`; writes eval.json and eval.png (held-out images above their
    reconstructions) to `out`. The run folder is only read, unless `write_scale` asks for the measured
    latent_scale to be stored in its config.yaml (what `ldm train` needs of a stage-1 model)."""
    run_dir, out = Path(run_dir), Path(out)
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num-images = {num_images}: expected at least 1")
    check_writable(out, "--out", folder=True)
    dev = resolve_device(device)
    model, cfg = load_autoencoder(run_dir, dev)
    model = prepare_for_inference(model, dev)
    dataset = open_dataset(data, cfg.data.resolution, cfg.model.in_channels, split, captions=False)
    feature_net = load_feature_net(features) if features else None
    figures = evaluate_reconstruction(model, dataset, num_images, batch_size, progress=progress,
                                      features=feature_net)
    figures["data"] = str(data)
    figures["model"] = str(run_dir)
    atomic_write_bytes(out / "eval.json", (json.dumps(figures, indent=2) + "\n").encode())
    images = torch.stack([dataset[i]["image"] for i in range(min(8, len(dataset)))]).to(dev)  # first 8 held out
    write_reconstruction_grid(model, images, out / "eval.png", dev, size=128)
    if write_scale:
        save_config(replace(cfg, model=replace(cfg.model, latent_scale=figures["latent_scale"])), run_dir / CONFIG_FILE)
    return figures
