"""Where the SD 1.5 UNet forward's time goes (batch 2, 64×64 latents, as `unet.py` runs it): milliseconds per kind
of work (attention, convolution, linear layers, the element-wise rest) and per level of the UNet, from
`torch.profiler`, for ours against diffusers and (`--compile`) diffusers under torch.compile with freezing.

    python benchmarks/breakdown.py [--dtype bf16] [--repeats 3] [--compile]

Each cell is the shortest of `--repeats` profiled forwards (the host's speed moves from minute to minute; the
shortest is the work, not the noise). The level of an operation is read from its shapes: a convolution's or an
attention's by its pixels or tokens, a linear layer's by the level's width (SD 1.5: 320, 640, 1280 channels;
1280 at both 16² and 8², told apart by their tokens); "context" are the cross-attentions' key and value
projections of the 77 text tokens, "embedding" the timestep's. Ours' 3×3 convolutions of few pixels run as
matrix products (`inference/conv.py`): counted as convolutions, with the gathering of their windows. Under
torch.compile the element-wise work runs in Inductor's fused kernels, timed as one ("fused element-wise").
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from harness import arguments, inductor_freezing, machine, write_json  # noqa: E402
from unet import build  # noqa: E402

WIDTHS = {320: "64²", 640: "32²"}  # SD 1.5's channels per level (1280: 16² or 8², by tokens)
PIXELS = {64: "64²", 32: "32²", 16: "16²", 8: "8²"}  # a feature map's side at batch 2
TOKENS = {4096: "64²", 1024: "32²", 256: "16²", 64: "8²"}  # tokens per image
LEVELS = ("64²", "32²", "16²", "8²", "context", "embedding", "all", "?")  # the table's order of rows
CONV_WINDOWS = {11520, 17280, 23040}  # 9·C_in of the convolutions that run as products (1280, 1920, 2560 in)


def where(name: str, shapes: list) -> tuple[str, str]:
    """(kind of work, level) of one profiled operation from its name and input shapes."""
    maps = [s for s in shapes if s and len(s) == 4]
    if "scaled_dot_product" in name:
        return "attention", TOKENS.get(maps[0][2] if maps else 0, "?")
    if "convolution" in name:  # oneDNN's (plain or with fused operations), cuDNN's
        return "convolution", PIXELS.get(maps[0][2] if maps else 0, "?")
    if name == "aten::addmm" and shapes[1][-1] in CONV_WINDOWS:  # (C_out, 9·C_in) · windows, either way round
        pixels = shapes[2][-1] if shapes[1][0] == 1280 else shapes[1][0]
        return "convolution", {512: "16²", 128: "8²"}.get(pixels, "?")
    if name == "aten::copy_" and shapes and len(shapes[0]) == 4 and shapes[0][1] == shapes[0][2] in (8, 16):
        return "convolution", PIXELS[shapes[0][1]]  # the windows a product-convolution gathers, (B, H, W, C)
    if name in ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"):
        x, out_features = linear_shapes(name, shapes)
        if x[0] <= 2:
            return "linear", "embedding"
        if x[-1] == 768:
            return "linear", "context"
        return "linear", WIDTHS.get(min(x[-1], out_features), "8²" if x[0] <= 128 else "16²")
    if "CompiledFxGraph" in name:
        return "fused element-wise", "all"
    return "element-wise and other", "all"


def linear_shapes(name: str, shapes: list) -> tuple[list[int], int]:
    """(input shape, output features) of a linear product: `mm(x, w)`, `addmm(b, x, w)` (w: (K, N)), or oneDNN's
    `_linear_pointwise(x, w, ...)` and its `.binary(x, other, w, ...)` (w: (N, K))."""
    if name == "aten::addmm":
        return shapes[1], shapes[2][-1]
    if name == "aten::mm":
        return shapes[0], shapes[1][-1]
    x = shapes[0]
    binary = len(shapes) > 2 and len(shapes[2]) == 2 and shapes[2][1] == x[-1]
    return x, (shapes[2] if binary else shapes[1])[0]


def breakdown(call, repeats: int, cuda: bool) -> dict[tuple[str, str], float]:
    """Milliseconds per (kind, level): the shortest of `repeats` profiled calls, cell by cell; on CUDA the time of
    the kernels each operation launched."""
    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runs = []
    for _ in range(repeats):
        with profile(activities=activities, record_shapes=True) as prof:
            call()
        cells: dict[tuple[str, str], float] = collections.Counter()
        for event in prof.key_averages(group_by_input_shape=True):
            micros = event.self_device_time_total if cuda else event.self_cpu_time_total
            cells[where(event.key, event.input_shapes)] += micros / 1e3
        runs.append(cells)
    return {cell: min(run.get(cell, 0.0) for run in runs) for cell in set().union(*runs)}


def main() -> None:
    def extra(p):
        p.add_argument("--compile", action="store_true",
                       help="also diffusers under torch.compile (Inductor, freezing), as unet.py --compile")

    args = arguments(__doc__, extra)
    print(f"Where the UNet forward's time goes, SD 1.5, batch 2, 64×64 latents — {machine()}")
    if args.compile:
        inductor_freezing()
    figures = {}
    for name in args.dtype:
        impls = {"ours": build("ours", name, args.device)[1], "diffusers": build("diffusers", name, args.device)[1]}
        if args.compile:
            impls["diffusers + torch.compile"] = build("diffusers", name, args.device, compile_=True)[1]
        cells = {impl: breakdown(call, args.repeats, args.device.startswith("cuda")) for impl, call in impls.items()}
        keys = sorted(set().union(*cells.values()), key=lambda key: (key[0], LEVELS.index(key[1])))
        print(f"\n### {name}: ms per forward (shortest of {args.repeats} profiles per cell)\n")
        print("| work | level | " + " | ".join(impls) + " |\n|---|---|" + "---|" * len(impls))
        for key in keys:
            print(f"| {key[0]} | {key[1]} | " + " | ".join(f"{cells[i].get(key, 0.0):.1f}" for i in impls) + " |")
        print("| **sum** | | " + " | ".join(f"**{sum(cells[i].values()):.1f}**" for i in impls) + " |")
        figures[name] = {impl: {f"{k[0]} {k[1]}": v for k, v in c.items()} for impl, c in cells.items()}
        del impls
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
