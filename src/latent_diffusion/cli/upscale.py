"""`ldm upscale`: a super-resolution model (conditioning.spatial: low_res) draws a large image from a small one."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from latent_diffusion.cli.common import naming, seed_int


def cmd_upscale(args: argparse.Namespace) -> None:
    from latent_diffusion.images import open_image
    from latent_diffusion.pipeline import Pipeline
    from latent_diffusion.pipeline.infotext import format_infotext
    from latent_diffusion.pipeline.outputs import check_writable, output_file
    from latent_diffusion.samplers import sampler_label

    output = naming("-o", output_file, args.output)
    check_writable([output])
    image = naming("IN", open_image, args.input)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    if pipe.config.conditioning.spatial != "low_res":
        raise ValueError(f"--model {args.model}: not a super-resolution model (conditioning.spatial = "
                         f"'{pipe.config.conditioning.spatial}', expected 'low_res'; see configs/ldm/fashion-sr.yaml)")
    f = pipe.ae_config.model.downsample_factor
    width, height = image.width * f, image.height * f
    settings = pipe.settings(args.steps, args.guidance, args.sampler, names={"guidance_scale": "--guidance"})
    seed = random.randrange(2**32) if args.seed is None else args.seed
    level = naming("--noise-level", pipe.noise_level, args.noise_level)
    big = pipe(args.prompt, image=image, height=height, width=width, steps=settings.steps, seed=seed,
               guidance_scale=settings.guidance_scale, sampler=settings.sampler, karras=settings.grid.karras,
               noise_level=level)[0]
    parameters = format_infotext(args.prompt, None, settings.steps,
                                 sampler_label(settings.sampler, settings.grid.karras), settings.guidance_scale, seed,
                                 width, height, model=Path(args.model).stem)
    noise = "" if level is None else f", Noise level: {level}"
    Pipeline.save([big], output, [f"{parameters}, Upscale: {f}x from {Path(args.input).name}{noise}"])
    print(f"wrote {output} ({image.width}x{image.height} -> {width}x{height}, seed {seed})")


def add_upscale_command(sub) -> None:
    """`upscale`."""
    p = sub.add_parser("upscale", help="draw a large image from a small one with a super-resolution model",
                       description="The output is the input's size times the model's autoencoder factor (x4 for "
                                   "configs/ldm/fashion-sr.yaml); its PNG carries the parameters.")
    p.add_argument("input", metavar="IN", help="the small image")
    p.add_argument("-o", "--output", default="upscaled.png", metavar="OUT", help="the large image (default "
                                                                                  "upscaled.png)")
    p.add_argument("--model", required=True, help="a super-resolution model folder (conditioning.spatial: low_res)")
    p.add_argument("--prompt", default="", help="what the image shows, for models conditioned on text or classes "
                                                "(default: none, the unconditional branch)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    p.add_argument("--noise-level", type=int, default=None,
                   help="for noise-augmented upscalers (SD's x4): how much noise the small image gets, 0-350 "
                        "(default: the model's, 20; more lets the model invent more detail)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (default: a random one, printed)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"], help="weights and math")
    p.set_defaults(func=cmd_upscale)
