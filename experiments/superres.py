"""×4 super-resolution on Fashion-MNIST (issue 21; the paper's SR LDM, section 4.4): held-out test images are
shrunk 4× (area average, 32² → 8²) and brought back to 32² by bicubic interpolation and by the SR LDM
(configs/ldm/fashion-sr.yaml: the 8×8 image concatenated to the latents of the f = 4 autoencoder), without a class
(the empty prompt) and with the image's class. Each is compared with the original: PSNR and SSIM per image
(`evaluation.metrics`, equal to scikit-image's), and the FID of the set against other real test images in the
domain feature network's space (models/features-fashion, as `ldm eval-fid`). The autoencoder's own
reconstructions of the originals are scored too: no LDM decoding through it can beat them.

    ldm train --config configs/ldm/fashion-sr.yaml --data fashion-mnist --out runs/fashion-sr
    ldm convert runs/fashion-sr models/ldm-fashion-sr --to native --dtype fp16
    python experiments/superres.py --model models/ldm-fashion-sr --out docs/experiments/superres

`results.json` and `grid.png` (8×8 input | bicubic | LDM | original, first 8 images) are written to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from latent_diffusion.data import open_dataset
from latent_diffusion.data.fashion_mnist import caption_for
from latent_diffusion.evaluation.features import extract, load_feature_net
from latent_diffusion.evaluation.fid import fid
from latent_diffusion.evaluation.generative import reference_images
from latent_diffusion.evaluation.metrics import psnr, ssim
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
FACTOR = 4


def shrink(images: torch.Tensor, factor: int = FACTOR) -> torch.Tensor:
    """Images (N, C, H, W) averaged over factor × factor blocks (the low-resolution inputs)."""
    return F.avg_pool2d(images, factor)


def bicubic(low: torch.Tensor, factor: int = FACTOR) -> torch.Tensor:
    """The bicubic baseline: low-resolution images enlarged `factor` times, clamped to [-1, 1]."""
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def scores(upscaled: torch.Tensor, originals: torch.Tensor, features, reference: torch.Tensor) -> dict:
    """Mean PSNR and SSIM against the originals, and the domain FID against the reference features."""
    return {"psnr": float(psnr(upscaled, originals).mean()), "ssim": float(ssim(upscaled, originals).mean()),
            "fid": fid(extract(features, upscaled)[0], reference)}


@torch.no_grad()
def reconstructed(pipe: Pipeline, images: torch.Tensor, batch: int) -> torch.Tensor:
    """The SR model's autoencoder's reconstructions (posterior mode) of `images`: the ceiling of its LDM."""
    return torch.cat([pipe.autoencoder(images[s:s + batch], sample_posterior=False)[0].float().clamp(-1, 1)
                      for s in range(0, len(images), batch)])


def upscale(pipe: Pipeline, low: torch.Tensor, prompts: list[str], batch: int, seed: int, steps: int | None
            ) -> torch.Tensor:
    """The SR model's images for `low` (N, C, h, w), `prompts` one per image, in batches (image k with seed + k)."""
    size = low.shape[-1] * pipe.ae_config.model.downsample_factor
    return torch.cat([pipe.generate_tensors(prompts[s:s + batch], image=low[s:s + batch], height=size, width=size,
                                            seed=seed + s, steps=steps, progress=False)
                      for s in range(0, len(low), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the SR model folder")
    parser.add_argument("--features", default=str(ROOT / "models" / "features-fashion"))
    parser.add_argument("--count", type=int, default=2000, help="held-out test images (default 2000)")
    parser.add_argument("--reference", type=int, default=8000,
                        help="other real test images, the FID reference (default 8000: count + reference ≤ 10,000)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/superres")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    test = open_dataset("fashion-mnist", pipe.config.data.resolution, 1, "test")
    images = reference_images(test)
    if args.count + args.reference > len(images):
        parser.error(f"--count {args.count} + --reference {args.reference}: the test split has {len(images)} images")
    labels = [int(test[i]["label"]) for i in range(args.count)]
    originals, reference_set = images[:args.count], images[-args.reference:]  # FID against other test images
    features = load_feature_net(args.features)
    reference = extract(features, reference_set)[0]
    low = shrink(originals)
    begin = time.time()
    rows = {"bicubic": bicubic(low), "LDM, no class": upscale(pipe, low, [""] * args.count, args.batch, args.seed,
                                                               args.steps),
            "LDM, class prompt": upscale(pipe, low, [caption_for(label) for label in labels], args.batch, args.seed,
                                         args.steps)}
    minutes = (time.time() - begin) / 60
    rows["autoencoder reconstruction (ceiling)"] = reconstructed(pipe, originals, args.batch)
    results = {name: scores(upscaled, originals, features, reference) for name, upscaled in rows.items()}
    results["originals"] = {"fid": fid(extract(features, originals)[0], reference)}
    summary = {"images": args.count, "reference": args.reference, "factor": FACTOR, "seed": args.seed,
               "steps": args.steps or pipe.config.sampling.steps, "sampler": pipe.config.sampling.sampler,
               "guidance": pipe.config.sampling.guidance_scale, "sampling_minutes": round(minutes, 1),
               "results": results}
    atomic_write_bytes(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    shown = [F.interpolate(low[:8], scale_factor=FACTOR, mode="nearest"), rows["bicubic"][:8],
             rows["LDM, no class"][:8], originals[:8]]
    save_image(make_grid(shown, scale=3, captions=["8x8 input", "bicubic", "LDM (no class)", "original"]),
               out / "grid.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
