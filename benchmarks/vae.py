"""VAE of Stable Diffusion (83.7 M parameters): decode a 64×64×4 latent to a 512×512 image, and encode one;
ours against diffusers' AutoencoderKL with the same (random) weights.

    python benchmarks/vae.py [--dtype fp32 bf16] [--repeats 3] [--size 512] [--tile 64]

Ours runs as `Pipeline` runs it: channels-last on a CPU, in bands of rows (`--whole`: whole layers).
`--tile 64` decodes in overlapping 64×64 latent tiles (512² pixels; 16 latents of overlap) in both: ours
`AutoencoderKL.decode_tiled`, diffusers' `enable_tiling()` set to the same tile; for 1024² and larger images
in the memory of a 512² decode. The two blend their overlaps differently, so their images differ there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (DTYPES, alternate, arguments, at_dtype, machine, measure_peak, peaks, table,  # noqa: E402
                     write_json)

from latent_diffusion.autoencoder import AutoencoderKL  # noqa: E402
from latent_diffusion.autoencoder.bands import inference_bands  # noqa: E402
from latent_diffusion.config import AutoencoderConfig  # noqa: E402
from latent_diffusion.runtime import channels_last_on_cpu  # noqa: E402
from latent_diffusion.io.diffusers_config import vae_config_to_diffusers  # noqa: E402
from latent_diffusion.io.keymaps import vae_state_to_diffusers  # noqa: E402

IMPLS = ("ours", "diffusers")


def build(impl: str, op: str, dtype: torch.dtype, device: str, size: int, tile: int = 0, whole: bool = False):
    cfg = AutoencoderConfig(resolution=size)
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg)
    if impl == "ours":
        model = ours
    else:
        from diffusers import AutoencoderKL as DiffusersVAE
        model = DiffusersVAE.from_config(vae_config_to_diffusers(cfg))
        model.load_state_dict(vae_state_to_diffusers(cfg, ours.state_dict()))
        del ours
        if tile:
            model.enable_tiling()
            model.tile_latent_min_size, model.tile_sample_min_size = tile, tile * 8
            model.tile_overlap_factor = 0.25
    model = model.to(device).eval()
    if impl == "ours":  # as `Pipeline` runs it: channels-last on a CPU, in bands of rows (`autoencoder/bands.py`)
        model = channels_last_on_cpu(model, torch.device(device))
        model.bands = None if whole else inference_bands(torch.device(device), dtype)
    model, dtype, region = at_dtype(model, impl == "ours", dtype, device)
    gen = torch.Generator().manual_seed(1)
    if op == "decode":
        z = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device, dtype)

        @torch.inference_mode()
        def call():
            with region():
                if impl == "ours":
                    return (model.decode_tiled(z, tile) if tile else model.decode(z)).float()
                return model.decode(z).sample.float()
    else:
        x = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)

        @torch.inference_mode()
        def call():
            with region():
                return (model.encode(x).mean if impl == "ours" else model.encode(x).latent_dist.mean).float()
    return call


def main() -> None:
    def extra(p):
        p.add_argument("--size", type=int, default=512, help="image side (multiple of 8)")
        p.add_argument("--op", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
        p.add_argument("--tile", type=int, default=0, help="decode in overlapping latent tiles of this size")
        p.add_argument("--whole", action="store_true", help="ours without bands of rows (whole layers at once)")

    args = arguments(__doc__, extra)
    if args.peak:
        measure_peak(build(args.impl, args.op[0], DTYPES[args.dtype[0]], args.device, args.size, args.tile,
                           args.whole))
        return
    tiling = f", {args.tile}×{args.tile} latent tiles" if args.tile else ""
    print(f"VAE at {args.size}×{args.size}{tiling} — {machine()}")
    figures = {}
    for op in args.op:
        for name in args.dtype:
            calls = {impl: build(impl, op, DTYPES[name], args.device, args.size, args.tile, args.whole)
                     for impl in IMPLS}
            outputs = {impl: fn() for impl, fn in calls.items()}
            times = alternate(calls, args.repeats, warmup=0)
            rows = table(f"VAE {op} {args.size}² {name}{tiling}", times,
                         peaks(args, __file__, IMPLS, "--op", op, "--dtype", name, "--size", str(args.size),
                               "--tile", str(args.tile), *(["--whole"] if args.whole else [])))
            diff = (outputs["ours"] - outputs["diffusers"]).abs().max().item()
            print(f"\nmax |ours − diffusers| = {diff:.2e}")
            figures[f"{op} {name}"] = {"rows": rows, "max_abs_diff": diff}
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
