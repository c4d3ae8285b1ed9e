"""A whole text-to-image generation with the Stable Diffusion 1.5 architecture: 512×512, 20 DPM-Solver++(2M)
steps, guidance 7.5, one image, end to end (tokenize, encode, 20 guided UNet steps, VAE decode); ours
(`Pipeline`) against diffusers' `StableDiffusionPipeline` reading the same random weights, which our converter
writes as a diffusers folder.

    python benchmarks/generate.py [--dtype bf16] [--repeats 1] [--steps 20] [--compile] [--inductor]

`--compile` adds diffusers' pipeline with its UNet and its VAE's decoder under torch.compile (Inductor, freezing:
the peers of `unet.py --compile` and `vae.py --compile`); its first call compiles, so then each implementation has
one untimed call before the timed ones (else none: a first call's set-up counts, as a user meets it). `--inductor`
adds ours with `backend="inductor"` (its UNet package read from the cache, `LDM_INDUCTOR_CACHE`, or compiled into it
before the timing; not `unet.py --inductor`'s package: the pipeline's calls also carry the text's mask). Ours as it
comes is `backend="auto"`: it runs a cached package where it measured it faster, so with the package cached the two
rows of ours run the same UNet.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (DTYPES, alternate, arguments, inductor_freezing, machine, measure_peak, peaks,  # noqa: E402
                     table, write_json)
from unet import random_unet  # noqa: E402

from latent_diffusion.autoencoder import AutoencoderKL  # noqa: E402
from latent_diffusion.conditioning.clip import ClipTextConfig, ClipTextTransformer  # noqa: E402
from latent_diffusion.config import AutoencoderConfig, ConditioningConfig, SamplingConfig, UNetConfig  # noqa: E402
from latent_diffusion.formats.diffusers_format import write_diffusers  # noqa: E402
from latent_diffusion.formats.model import ModelParts  # noqa: E402
from latent_diffusion.pipeline import Pipeline  # noqa: E402

IMPLS = ("ours", "diffusers")
COMPILED = "diffusers + torch.compile"
INDUCTOR = "ours + inductor"
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def sd15_parts() -> ModelParts:
    """The SD 1.5 architecture with seeded random weights (no weights can be downloaded here)."""
    unet_cfg, vae_cfg, clip = UNetConfig(), AutoencoderConfig(latent_scale=0.18215), ClipTextConfig()
    unet = random_unet(unet_cfg)
    return ModelParts(unet_config=unet_cfg, unet=unet.state_dict(), autoencoder_config=vae_cfg,
                      autoencoder=AutoencoderKL(vae_cfg).state_dict(),
                      conditioning=ConditioningConfig(encoder="clip", clip=clip),
                      text_encoder=ClipTextTransformer(clip).state_dict(),
                      sampling=SamplingConfig(sampler="dpmpp_2m", timestep_spacing="leading", steps_offset=1),
                      resolution=512)


def build(impl: str, name: str, device: str, steps: int, folder: Path):
    if impl in ("ours", INDUCTOR):
        pipe = Pipeline.from_parts(sd15_parts(), device=device, precision=name,
                                   backend="inductor" if impl == INDUCTOR else "auto")

        def call():
            return pipe.generate_tensors(PROMPT, steps=steps, guidance_scale=7.5, sampler="dpmpp_2m", seed=0,
                                         progress=False)
    else:
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPES[name], safety_checker=None,
                                                                 requires_safety_checker=False).to(device)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if impl == COMPILED:
            pipe.unet, pipe.vae.decoder = torch.compile(pipe.unet), torch.compile(pipe.vae.decoder)

        def call():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images
    return call


def main() -> None:
    def extra(p):
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--folder", default=None,
                       help="where to write the diffusers copy of the weights (default: a temporary folder)")
        p.add_argument("--compile", action="store_true",
                       help="also diffusers' pipeline with its UNet and VAE decoder under torch.compile (freezing)")
        p.add_argument("--inductor", action="store_true",
                       help="also ours with backend='inductor' (the UNet's package from the cache, or compiled first)")

    args = arguments(__doc__, extra, int8=True)
    args.dtype = args.dtype if args.dtype != ["fp32", "bf16"] else ["bf16"]
    if args.peak:
        measure_peak(build(args.impl, args.dtype[0], args.device, args.steps, Path(args.folder)))
        return
    if args.compile:
        inductor_freezing()
    print(f"text to image, SD 1.5 architecture, 512², {args.steps} DPM-Solver++ steps, w = 7.5 — {machine()}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        write_diffusers(sd15_parts(), folder)
        for name in args.dtype:
            inductor = args.inductor and name != "int8"  # int8 runs on PyTorch only
            impls = IMPLS + ((COMPILED,) if args.compile else ()) + ((INDUCTOR,) if inductor else ())
            calls = {impl: build(impl, name, args.device, args.steps, folder) for impl in impls}
            if inductor:
                calls[INDUCTOR]()  # the package read (or compiled) here, not in the timing
            # the first call of the compiled pipeline compiles it: with --compile each gets one untimed call first
            times = alternate(calls, args.repeats, warmup=1 if args.compile else 0)
            figures[name] = {"rows": table(f"text to image {name}", times,
                                           peaks(args, __file__, IMPLS, "--dtype", name, "--steps", str(args.steps),
                                                 "--folder", str(folder)))}
            del calls
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
