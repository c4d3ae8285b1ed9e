"""A training step (forward + backward + AdamW) of a UNet, samples per second: the bundled shapes model's UNet
(batch 64 of 16×16×4 latents, MiniLM-width context) and the SD 1.5-shaped UNet (batch 2 of 32×32×4 latents,
77×768 context); ours against diffusers' UNet2DConditionModel with the same weights.

    python benchmarks/train_step.py [--model shapes sd15] [--repeats 3]

fp32 weights; --dtype bf16 runs the step under bf16 autocast (as `training.precision: bf16` does). The
SD-shaped models are too large to hold two of (with their optimizer state) in memory: each implementation is
timed in its own process, one after the other, instead of alternating.

On a CPU our trainers set the C heap to keep freed memory for reuse (`runtime.reuse_freed_memory`), and so does
this script for ours; diffusers runs as its users get it, and again ("diffusers, freed memory reused") with the
same setting, to show what is the allocator's and what the network's. The shapes model's two run in one process,
so both get the setting there.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from harness import DTYPES, alternate, arguments, machine, table, timed, write_json  # noqa: E402
from roofline import matmul_rate  # noqa: E402
from unet import as_impl, random_unet  # noqa: E402

from latent_diffusion.config import LDMRunConfig, UNetConfig, load_config  # noqa: E402
from latent_diffusion.runtime import reuse_freed_memory  # noqa: E402

IMPLS = ("ours", "diffusers")
REUSED = "diffusers, freed memory reused"  # diffusers in a process with the C heap set as our trainers set it
ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"batch": 64, "size": 16, "tokens": 20}
SD15 = {"batch": 2, "size": 32, "tokens": 77}


def model_config(model: str) -> tuple[UNetConfig, dict]:
    if model == "shapes":
        # diffusers has no position codes on the transformer tokens (they cost nothing measurable): leave them out
        cfg = load_config(ROOT / "configs/ldm/shapes.yaml", LDMRunConfig).unet
        return replace(cfg, position_embedding=False), SHAPES
    return UNetConfig(), SD15


def build(impl: str, model: str, name: str, device: str):
    cfg, shape = model_config(model)
    net = as_impl(impl, cfg, random_unet(cfg), shape["size"]).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(1)
    b, s = shape["batch"], shape["size"]
    x = torch.randn(b, cfg.in_channels, s, s, generator=gen).to(device)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    context = torch.randn(b, shape["tokens"], cfg.context_dim, generator=gen).to(device)
    target = torch.randn(b, cfg.out_channels, s, s, generator=gen).to(device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[name], enabled=name != "fp32")

    def step():
        with autocast:
            out = net(x, t, context) if impl == "ours" else net(x, t, encoder_hidden_states=context).sample
            loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, b


def step_flops(model: str, name: str, device: str) -> int:
    """FLOPs of one of our training steps (forward and backward; the optimizer's element-wise work is not counted)."""
    step, _ = build("ours", model, name, device)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def separate(args, model: str, name: str) -> dict[str, list[float]]:
    """Time each implementation in its own process (the SD-shaped model and its optimizer fill the memory)."""
    times = {}
    for label, impl in {**{impl: impl for impl in IMPLS}, REUSED: "diffusers"}.items():
        reuse = ["--reuse-freed-memory"] if label in ("ours", REUSED) else []
        proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--model", model, "--dtype", name,
                               "--repeats", str(args.repeats), "--device", args.device, *reuse],
                              capture_output=True, text=True, check=True)
        times[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return times


def main() -> None:
    def extra(p):
        p.add_argument("--model", nargs="+", default=["shapes", "sd15"], choices=["shapes", "sd15"])
        p.add_argument("--reuse-freed-memory", action="store_true", help="(with --impl) set the C heap as our "
                       "trainers do on a CPU")

    args = arguments(__doc__, extra)
    if args.device == "cpu" and (args.reuse_freed_memory or not args.impl):
        reuse_freed_memory()
    if args.impl:  # one implementation alone: print its step times as JSON
        step, _ = build(args.impl, args.model[0], args.dtype[0], args.device)
        step()
        print(json.dumps(timed(step, args.repeats)))
        return
    print(f"UNet training step — {machine()}")
    figures = {}
    for model in args.model:
        batch = model_config(model)[1]["batch"]
        for name in args.dtype:
            if model == "shapes":
                steps = {impl: build(impl, model, name, args.device)[0] for impl in IMPLS}
                times = alternate(steps, args.repeats)
            else:
                times = separate(args, model, name)
            rows = table(f"training step, {model} UNet, batch {batch}, {name} (samples/s = {batch} / median)",
                         times)
            for row in rows:
                print(f"  {row['name']}: {batch / row['median_s']:.1f} samples/s")
            figures[f"{model} {name}"] = {"rows": rows,
                                          "samples_per_s": {k: batch / statistics.median(v) for k, v in times.items()}}
            if model == "shapes":  # the share of the machine's matmul rate a step achieves (the SD-sized one: too big)
                flops, rate = step_flops(model, name, args.device), matmul_rate(DTYPES[name], args.device)
                achieved = flops / statistics.median(times["ours"]) / 1e9
                print(f"  ours: {flops / 1e9:.1f} GFLOP per step, {achieved:.0f} GFLOP/s, {achieved / rate:.0%} of "
                      f"the {name} matmul rate ({rate:.0f} GFLOP/s)")
                figures[f"{model} {name}"].update(step_gflop=flops / 1e9, achieved_gflops=achieved,
                                                  matmul_gflops=rate)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
