"""The paper's core claim at small scale: diffusion in pixel space (f = 1) against latent diffusion at f = 2, 4
and 8, on the same data (Fashion-MNIST, class-conditional, 32×32) with the same training wall-clock budget.

    python experiments/latent_vs_pixel.py --budget-minutes 10 --steps 20 --out runs/latent-vs-pixel

Each variant starts from `configs/ldm/fashion.yaml` (the bundled Fashion model's recipe) with its first stage and
a UNet whose levels reach the same 8×8 and 4×4 attention resolutions where the latent is large enough (table
`VARIANTS`). The budget is turned into steps: a short probe run measures each variant's training throughput
(images/s, the latent cache excluded) and the real run gets budget × throughput / batch steps, so the learning
-rate schedule completes and other work on the machine cannot change what is trained. Then every model draws
the same 1,000 class-conditional samples, scored by domain-feature FID / KID / class accuracy against the test
split, timed per image. Writes `results.json`, `fid.png` and `samples.png` to --out; rerunning resumes.

The autoencoders are trained once beforehand (their cost is shared by every model that uses them, as in the
paper): `ldm train-autoencoder --config configs/autoencoder/fashion-f{2,8}.yaml --data fashion-mnist
--out runs/ae-fashion-f{2,8}` and `ldm eval-autoencoder` on each; f = 4 is the shipped one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from latent_diffusion.config import LDMRunConfig, load_config
from latent_diffusion.data import open_dataset
from latent_diffusion.evaluation.features import load_feature_net
from latent_diffusion.evaluation.generative import evaluate_samples, reference_features
from latent_diffusion.evaluation.plot import line_plot
from latent_diffusion.evaluation.sweep import Setting
from latent_diffusion.images import make_grid, save_image
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

ROOT = Path(__file__).resolve().parent.parent
# f: (first stage, UNet channel_mult, attention at these downsampling rates: the 8×8 and 4×4 levels)
VARIANTS = {
    1: ("pixel", (1, 2, 2, 2), (4, 8)),                                  # 32 → 16 → 8 → 4
    2: ("runs/ae-fashion-f2", (1, 2, 2), (2, 4)),                        # 16 → 8 → 4
    4: ("models/autoencoder-fashion-f4", (1, 2), (1, 2)),                # 8 → 4 (the shipped model's UNet)
    8: ("runs/ae-fashion-f8", (1, 2), (1, 2)),                           # 4 → 2
}


def variant_config(f: int, base: LDMRunConfig) -> LDMRunConfig:
    first_stage, mult, attention = VARIANTS[f]
    channels = 1 if first_stage == "pixel" else 4
    unet = replace(base.unet, in_channels=channels, out_channels=channels, channel_mult=mult,
                   attention_resolutions=attention)
    autoencoder = first_stage if first_stage == "pixel" else str(ROOT / first_stage)
    return replace(base, autoencoder=autoencoder, unet=unet)


def measure_throughput(cfg: LDMRunConfig, data: str, folder: Path, steps: int) -> float:
    """Training images/s of `cfg`: the median of the probe run's log lines after the first (warm-up)."""
    log_every = max(1, steps // 4)
    probe = replace(cfg, training=replace(cfg.training, max_steps=steps, log_every=log_every,
                                          checkpoint_every=10**9, image_every=10**9, ema_decay=0.0),
                    sampling=replace(cfg.sampling, prompts=()))
    if not (folder / "log.jsonl").is_file():
        train_ldm(probe, data, folder)
    rates = [json.loads(line)["images_per_s"] for line in (folder / "log.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=12.0, help="training wall-clock per model")
    parser.add_argument("--factors", type=int, nargs="+", default=sorted(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--features", default=str(ROOT / "models/features-fashion"))
    parser.add_argument("--num", type=int, default=1000, help="samples per model for FID")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--probe-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("runs/latent-vs-pixel"))
    args = parser.parse_args()

    base = load_config(ROOT / "configs/ldm/fashion.yaml", LDMRunConfig)
    features = load_feature_net(args.features)
    reference = None
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for f in args.factors:
        cfg = variant_config(f, base)
        key = f"f{f}"
        if key not in results:
            ips = measure_throughput(cfg, args.data, args.out / f"probe-{key}", args.probe_steps)
            steps = max(1, round(args.budget_minutes * 60 * ips / cfg.training.batch_size))
            warmup = min(cfg.training.lr_warmup_steps, steps // 10)
            tcfg = replace(cfg.training, max_steps=steps, lr_warmup_steps=warmup,
                           checkpoint_every=max(1, steps // 4), image_every=steps, log_every=max(1, steps // 40))
            cfg = replace(cfg, training=tcfg)
            train_ldm(cfg, args.data, args.out / key)
            pipe = Pipeline.from_pretrained(args.out / key)
            if reference is None:
                reference = reference_features(features, open_dataset(args.data, base.data.resolution, 1, "test"))
            figures = evaluate_samples(pipe, features, reference, args.num,
                                       [Setting(args.sampler, args.steps, args.guidance)])["results"][0]
            results[key] = {"f": f, "latent": list(pipe.latent_size(None, None)),
                            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                            "train_images_per_s": ips, "train_steps": steps, "train_images": steps * tcfg.batch_size,
                            **figures}
            atomic_write_bytes(results_path, (json.dumps(results, indent=2) + "\n").encode())
        r = results[key]
        print(f"f = {f}: latent {r['latent']}, {r['train_images_per_s']:.0f} train img/s → {r['train_steps']} steps; "
              f"FID {r['fid']:.1f}, KID {r['kid']:.4f}, class accuracy {r['class_accuracy']:.1%}, "
              f"{r['seconds_per_image'] * 1000:.1f} ms/image to sample")
    done = [results[k] for k in sorted(results, key=lambda k: results[k]["f"])]
    fs = [r["f"] for r in done]
    line_plot({"FID after the budget": (fs, [r["fid"] for r in done])}, args.out / "fid.png",
              f"Fashion-MNIST, {args.budget_minutes:g} min of training each", "downsampling factor f", "FID",
              log_x=True, log_y=True)
    rows = [Pipeline.from_pretrained(args.out / f"f{f}").generate_tensors(
        [str(label) for label in range(10)], steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
        seed=0, progress=False) for f in fs]  # one row per f, one class per column
    save_image(make_grid(rows, scale=2, captions=[f"f = {f}" for f in fs]), args.out / "samples.png")


if __name__ == "__main__":
    main()
