"""VAE of Stable Diffusion (83.7 M parameters): decode a 64×64×4 latent to a 512×512 image, and encode one;
ours against diffusers' AutoencoderKL with the same (random) weights.

    python benchmarks/vae.py [--dtype fp32 bf16] [--repeats 3] [--size 512] [--tile 64] [--compile] [--openvino]

Ours runs as `Pipeline` runs it: channels-last on a CPU, in bands of rows (`--whole`: whole layers).
`--compile` adds diffusers' VAE under `torch.compile` (Inductor, freezing); `--openvino` adds it converted by
`openvino.convert_model` and compiled for the CPU at the inference precision of --dtype (the peers of the UNet's
`--compile` and `--openvino`).
`--tile 64` decodes in overlapping 64×64 latent tiles (512² pixels; 16 latents of overlap) in both: ours
`AutoencoderKL.decode_tiled`, diffusers' `enable_tiling()` set to the same tile; for 1024² and larger images
in the memory of a 512² decode. The two blend their overlaps differently, so their images differ there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (DTYPES, alternate, arguments, at_dtype, inductor_freezing, machine, measure_peak,  # noqa: E402
                     peaks, table, write_json)

from latent_diffusion.autoencoder import AutoencoderKL  # noqa: E402
from latent_diffusion.config import AutoencoderConfig  # noqa: E402
from latent_diffusion.formats.diffusers_config import vae_config_to_diffusers  # noqa: E402
from latent_diffusion.formats.keymaps import vae_state_to_diffusers  # noqa: E402

IMPLS = ("ours", "diffusers")
PEERS = {"compile": "diffusers + torch.compile", "openvino": "openvino"}  # the flags that add them


class _Op(torch.nn.Module):
    """diffusers' VAE decode or encode (the distribution's mean) as a plain tensor function."""

    def __init__(self, vae: torch.nn.Module, op: str):
        super().__init__()
        self.vae, self.op = vae, op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(x).sample if self.op == "decode" else self.vae.encode(x).latent_dist.mean


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
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 4, size // 8, size // 8, generator=gen) if op == "decode"
         else torch.rand(1, 3, size, size, generator=gen) * 2 - 1)
    if impl == PEERS["openvino"]:
        return openvino_call(_Op(model, op), x, dtype)
    if impl == PEERS["compile"]:
        fn = torch.compile(_Op(model.to(dtype), op))
        x = x.to(device, dtype)
        return torch.inference_mode()(lambda: fn(x).float())
    # ours as `Pipeline` runs it (`prepare_for_inference`): channels-last on a CPU, in bands of rows unless `whole`
    model, dtype, region = at_dtype(model, impl == "ours", dtype, device, row_bands=not whole)
    x = x.to(device, dtype)
    if impl != "ours":
        op_of = _Op(model, op)
    elif op == "decode":
        op_of = (lambda z: model.decode_tiled(z, tile)) if tile else model.decode
    else:
        op_of = lambda image: model.encode(image).mean

    @torch.inference_mode()
    def call():
        with region():
            return op_of(x).float()

    return call


def openvino_call(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """`module(x)` converted by OpenVINO (fp32 weights and inputs) and compiled for the CPU at `dtype`'s
    inference precision: a callable returning a torch tensor."""
    import openvino

    from latent_diffusion.inference.openvino import HINTS
    with torch.no_grad():
        graph = openvino.convert_model(module.float(), example_input=(x.float(),))
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    request = openvino.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": HINTS[name]}) \
        .create_infer_request()
    array = x.float().numpy()
    return lambda: torch.from_numpy(request.infer([array])[0].copy())


def main() -> None:
    def extra(p):
        p.add_argument("--size", type=int, default=512, help="image side (multiple of 8)")
        p.add_argument("--op", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
        p.add_argument("--tile", type=int, default=0, help="decode in overlapping latent tiles of this size")
        p.add_argument("--whole", action="store_true", help="ours without bands of rows (whole layers at once)")
        p.add_argument("--compile", action="store_true", help="also time diffusers' VAE under torch.compile")
        p.add_argument("--openvino", action="store_true", help="also time diffusers' VAE converted to OpenVINO")

    args = arguments(__doc__, extra)
    if args.tile and (args.compile or args.openvino):
        raise SystemExit("--tile: only ours and diffusers decode in tiles (leave out --compile and --openvino)")
    if args.compile:
        inductor_freezing()
    impls = IMPLS + tuple(peer for flag, peer in PEERS.items() if getattr(args, flag))
    if args.peak:
        call = build(args.impl, args.op[0], DTYPES[args.dtype[0]], args.device, args.size, args.tile, args.whole)
        if args.impl in PEERS.values():
            call()  # converts or compiles: a one-off, like building the model, not part of the peak
        measure_peak(call)
        return
    tiling = f", {args.tile}×{args.tile} latent tiles" if args.tile else ""
    print(f"VAE at {args.size}×{args.size}{tiling} — {machine()}")
    figures = {}
    for op in args.op:
        for name in args.dtype:
            flags = [f"--{flag}" for flag in ("whole", "compile") if getattr(args, flag)]
            peak = peaks(args, __file__, impls, "--op", op, "--dtype", name, "--size", str(args.size),
                         "--tile", str(args.tile), *flags)
            calls = {impl: build(impl, op, DTYPES[name], args.device, args.size, args.tile, args.whole)
                     for impl in impls}
            outputs = {impl: fn() for impl, fn in calls.items()}  # the warm-up (and compiling)
            times = alternate(calls, args.repeats, warmup=0)
            rows = table(f"VAE {op} {args.size}² {name}{tiling}", times, peak)
            diffs = {impl: (outputs["ours"] - out).abs().max().item() for impl, out in outputs.items()
                     if impl != "ours"}
            print("\nmax |ours − peer|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
            figures[f"{op} {name}"] = {"rows": rows, "max_abs_diff": diffs["diffusers"], "max_abs_diff_by_peer": diffs}
            del calls, outputs
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
