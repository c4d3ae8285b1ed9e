"""The rectified-flow objective (SD3's: straight paths, velocity target, logit-normal t) against ε-prediction on
the shapes task, with the same network, data and number of training steps; adherence at few and more steps.

    python experiments/flow_vs_eps.py --steps 600 --out runs/flow-vs-eps

Both start from `configs/ldm/shapes.yaml` (the bundled shapes model's recipe and UNet). The ε model keeps the
recipe's min-SNR-5 weighting and is sampled with DPM-Solver++(2M) and Euler; the flow model has
`diffusion.objective: flow` (no min-SNR: its weighting is the logit-normal t) and is sampled with the flow Euler
sampler (shift 1). Each draws one image per held-out caption (200, `ldm make-shapes --seed 1`) at 10 and 25 steps,
w = 5, scored by `evaluation.shapes.caption_adherence`. Writes `results.json` and a sample grid per setting.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from latent_diffusion.config import DiffusionConfig, LDMRunConfig, load_config, resolve_paths
from latent_diffusion.data.imagefolder import ImageFolder
from latent_diffusion.data.shapes import write_shapes_folder
from latent_diffusion.evaluation.shapes import adherence_grid, evaluate_model_adherence
from latent_diffusion.evaluation.sweep import Setting
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.images import save_image
from latent_diffusion.pipeline import Pipeline
from latent_diffusion.training.ldm import train_ldm

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = {"epsilon": ("dpmpp_2m", "euler"), "flow": ("flow_euler",)}


def variant_config(objective: str, base: LDMRunConfig, steps: int) -> LDMRunConfig:
    tcfg = replace(base.training, max_steps=steps, lr_warmup_steps=min(base.training.lr_warmup_steps, steps // 10),
                   checkpoint_every=max(1, steps // 4), image_every=steps, log_every=max(1, steps // 40))
    cfg = replace(base, training=tcfg)
    if objective == "flow":
        cfg = replace(cfg, diffusion=DiffusionConfig(objective="flow", p_uncond=base.diffusion.p_uncond),
                      sampling=replace(cfg.sampling, sampler="flow_euler"))
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/shapes-train"), help="training shapes (made if absent)")
    parser.add_argument("--held-out", type=Path, default=Path("runs/shapes-held-out"))
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=600, help="training steps of each model")
    parser.add_argument("--num", type=int, default=200, help="held-out captions")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("runs/flow-vs-eps"))
    args = parser.parse_args()

    if not args.data.is_dir():
        write_shapes_folder(args.data, args.train_images, seed=0)
    if not args.held_out.is_dir():
        write_shapes_folder(args.held_out, args.num, seed=1)
    held_out = ImageFolder(args.held_out, resolution=64)
    captions = [held_out.caption(i) for i in range(min(args.num, len(held_out)))]
    base = resolve_paths(load_config(ROOT / "configs/ldm/shapes.yaml", LDMRunConfig), ROOT / "configs/ldm/shapes.yaml")
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for objective, samplers in SAMPLERS.items():
        if objective not in results:
            cache = args.out / "epsilon" / "cache"  # the same autoencoder and images: encode them once
            if objective != "epsilon" and cache.is_dir() and not (args.out / objective / "cache").exists():
                shutil.copytree(cache, args.out / objective / "cache")
            train_ldm(variant_config(objective, base, args.steps), args.data, args.out / objective)
            pipe = Pipeline.from_pretrained(args.out / objective)
            sweep = [Setting(sampler, steps, args.guidance) for sampler in samplers for steps in (10, 25)]
            figures = evaluate_model_adherence(pipe, captions, sweep)
            for setting, images in zip(sweep, figures.pop("images")):
                save_image(adherence_grid(images, captions),
                           args.out / f"samples_{objective}_{setting.sampler}_{setting.steps}.png")
            results[objective] = {"train_steps": args.steps, **figures}
            atomic_write_bytes(results_path, (json.dumps(results, indent=2) + "\n").encode())
        for r in results[objective]["results"]:
            print(f"{objective}, {r['sampler']} {r['steps']} steps: all four right {r['all']:.1%}, colour "
                  f"{r['colour']:.1%}, shape {r['shape']:.1%}, size {r['size']:.1%}, position {r['position']:.1%}")


if __name__ == "__main__":
    main()
