"""Models trained on the same training compute, compared by sample quality: the DiT against the UNet (Peebles & Xie
2023, Fig. 9's "FID against Gflops" shape) and an LDM on a KL against one on a VQ first stage (the paper's Table 8),
class-conditional Fashion-MNIST at f = 4.

    python experiments/compute_budget.py --variants unet dit-s2 dit-s1 dit-b2 --out runs/backbones
    python experiments/compute_budget.py --variants kl vq --out runs/first-stages

Every variant starts from `configs/ldm/fashion.yaml` (the bundled Fashion model's recipe: batch 128, AdamW 5e-4,
cosine decay, min-SNR 5, EMA, p_uncond 0.1) and changes only what `VARIANTS` says. The budget is training FLOPs:
a variant's forward FLOPs per image are counted once (`torch.utils.flop_counter`), a step costs 3× forward × batch
(forward + backward), and each model trains budget / step-cost steps, so the comparison does not depend on the
host or on other work on it; the minutes each run's steps took (from its logged throughput) are reported beside. Then 1,000 samples per model
(100 per class; DPM-Solver++(2M), 25 steps, w = 1.5) are scored by domain-feature FID, KID and class accuracy
against the 10,000 test images. Writes `results.json`, `fid.png` and `samples.png` to --out; rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from latent_diffusion.backbones import build_backbone
from latent_diffusion.config import DiTConfig, LDMRunConfig, load_config, resolve_paths
from latent_diffusion.data import open_dataset
from latent_diffusion.evaluation.features import load_feature_net
from latent_diffusion.evaluation.generative import evaluate_samples, reference_features
from latent_diffusion.evaluation.plot import line_plot
from latent_diffusion.evaluation.sweep import Setting
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

ROOT = Path(__file__).resolve().parent.parent


def _dit(patch: int, hidden: int, depth: int, heads: int) -> dict:
    return {"backbone": "dit", "dit": DiTConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                                                 context_dim=128)}


# name: changes to the recipe (a DiT reads the 128-wide class token by cross-attention, as the UNet does)
VARIANTS = {
    "unet": {},
    "dit-s2": _dit(2, 192, 6, 3),   # DiT-S-like width at 1/2 depth, 2×2 patches: 16 tokens
    "dit-s1": _dit(1, 192, 6, 3),   # the same with 1×1 patches: 64 tokens, 4× the compute
    "dit-b2": _dit(2, 384, 8, 6),   # DiT-B-like width, 2×2 patches
    "kl": {"autoencoder": "runs/exp-ae-kl"},  # the KL and VQ autoencoders of "KL against VQ" (600 steps each)
    "vq": {"autoencoder": "runs/exp-ae-vq"},
}


def variant_config(name: str, base: LDMRunConfig) -> LDMRunConfig:
    changes = dict(VARIANTS[name])
    if "autoencoder" in changes:
        changes["autoencoder"] = str(ROOT / changes["autoencoder"])
    return replace(base, **changes)


def forward_flops(cfg: LDMRunConfig, latent: tuple[int, int]) -> int:
    """FLOPs of one image's forward pass through the variant's network (class token included)."""
    network = build_backbone(cfg.network)
    x = torch.zeros(1, cfg.network.in_channels, *latent)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(x, torch.ones(1), torch.zeros(1, 1, cfg.network.context_dim))
    return counter.get_total_flops()


def share_latent_cache(cfg: LDMRunConfig, out: Path, name: str, results: dict) -> None:
    """Give a new run the latent cache of an earlier variant with the same autoencoder (its fingerprint matches)."""
    target = out / name / "cache" / "latents.safetensors"
    for done in results.values():
        source = out / done["variant"] / "cache" / "latents.safetensors"
        if done["autoencoder"] == cfg.autoencoder and source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["unet", "dit-s2", "dit-s1", "dit-b2"], choices=VARIANTS)
    parser.add_argument("--budget-tflop", type=float, default=52.0,
                        help="training FLOPs per model (52: the UNet's 700 steps of batch 128)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--features", default=str(ROOT / "models/features-fashion"))
    parser.add_argument("--num", type=int, default=1000, help="samples per model for FID")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path("runs/compute-budget"))
    args = parser.parse_args()

    base = resolve_paths(load_config(ROOT / "configs/ldm/fashion.yaml", LDMRunConfig), ROOT / "configs/ldm/fashion.yaml")
    features = load_feature_net(args.features)
    reference = None
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.variants:
        cfg = variant_config(name, base)
        if name not in results:
            flops = forward_flops(cfg, (8, 8))
            steps = max(1, round(args.budget_tflop * 1e12 / (3 * flops * cfg.training.batch_size)))
            tcfg = replace(cfg.training, max_steps=steps, lr_warmup_steps=min(cfg.training.lr_warmup_steps, steps // 10),
                           checkpoint_every=max(1, steps // 4), image_every=steps, log_every=max(1, steps // 40))
            cfg = replace(cfg, training=tcfg)
            share_latent_cache(cfg, args.out, name, results)
            train_ldm(cfg, args.data, args.out / name)
            rates = [json.loads(line)["images_per_s"] for line in (args.out / name / "log.jsonl").open()]
            minutes = steps * cfg.training.batch_size / statistics.median(rates) / 60
            pipe = Pipeline.from_pretrained(args.out / name)
            if reference is None:
                reference = reference_features(features, open_dataset(args.data, base.data.resolution, 1, "test"))
            figures = evaluate_samples(pipe, features, reference, args.num,
                                       [Setting("dpmpp_2m", args.steps, args.guidance)])["results"][0]
            results[name] = {"variant": name, "backbone": cfg.backbone,
                             "parameters": sum(p.numel() for p in pipe.unet.parameters()),
                             "forward_gflop_per_image": flops / 1e9, "train_steps": steps,
                             "train_tflop": 3 * flops * cfg.training.batch_size * steps / 1e12,
                             "autoencoder": cfg.autoencoder, "train_minutes": minutes, **figures}
            atomic_write_bytes(results_path, (json.dumps(results, indent=2) + "\n").encode())
        r = results[name]
        print(f"{name}: {r['parameters'] / 1e6:.2f} M params, {r['forward_gflop_per_image']:.3f} GFLOP/image, "
              f"{r['train_steps']} steps ({r['train_tflop']:.1f} TFLOP, {r['train_minutes']:.1f} min on 2 cores); "
              f"FID {r['fid']:.1f}, KID {r['kid']:.4f}, class accuracy {r['class_accuracy']:.1%}")
    done = [results[name] for name in args.variants]
    dits = [r for r in done if r["backbone"] == "dit"]
    series = {"DiT": ([r["forward_gflop_per_image"] for r in dits], [r["fid"] for r in dits])} if dits else {}
    series.update({r["variant"]: ([r["forward_gflop_per_image"]], [r["fid"]]) for r in done if r["backbone"] != "dit"})
    line_plot(series, args.out / "fid.png", f"Fashion-MNIST, {args.budget_tflop:g} TFLOP of training each",
              "forward GFLOP per image", "FID", log_x=True)
    rows = [Pipeline.from_pretrained(args.out / name).generate_tensors(
        [str(label) for label in range(10)], steps=args.steps, guidance_scale=args.guidance, seed=0, progress=False)
        for name in args.variants]  # one row per variant, one class per column
    save_image(make_grid(rows, scale=2, captions=list(args.variants)), args.out / "samples.png")


if __name__ == "__main__":
    main()
