"""The machine's own limit and how close the UNet gets to it: measured fp32 and bf16 matmul GFLOP/s, the SD 1.5
UNet's FLOPs per forward (counted by torch's FlopCounterMode on diffusers' UNet), and the achieved fraction of
the matmul rate by our UNet forward at batch 2 (64×64×4 latents, 77×768 context), as `Pipeline` runs it.

    python benchmarks/roofline.py [--dtype fp32 bf16] [--repeats 3]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from harness import DTYPES, arguments, machine, timed, write_json  # noqa: E402
from unet import build  # noqa: E402


def matmul_rate(dtype: torch.dtype, device: str, n: int = 4096, repeats: int = 5) -> float:
    """Median GFLOP/s of an n×n by n×n matmul."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, repeats)) / 1e9


def unet_flops(device: str) -> int:
    """FLOPs of one SD 1.5 UNet forward at batch 2 (matmuls and convolutions; attention included), counted on
    diffusers' UNet: the network's own count, which our CPU paths undercut (upsampling convolutions by phases)."""
    _, call = build("diffusers", "fp32", device)
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def main() -> None:
    args = arguments(__doc__)
    print(f"roofline — {machine()}")
    flops = unet_flops(args.device)
    print(f"\nSD 1.5 UNet forward, batch 2: {flops / 1e12:.3f} TFLOP ({flops / 2e12:.3f} per image)\n")
    print("| dtype | matmul GFLOP/s | UNet forward | s | UNet GFLOP/s | fraction of matmul rate |\n"
          "|---|---|---|---|---|---|")
    figures = {"unet_flops_batch2": flops}
    for name in args.dtype:
        dtype = DTYPES[name]
        rate = matmul_rate(dtype, args.device)
        figures[name] = {"matmul_gflops": rate}
        _, call = build("ours", name, args.device)
        call()
        seconds = statistics.median(timed(call, args.repeats))
        achieved = flops / seconds / 1e9
        print(f"| {name} | {rate:.0f} | ours | {seconds:.2f} | {achieved:.0f} | {achieved / rate:.0%} |")
        figures[name].update({"unet_s": seconds, "unet_gflops": achieved})
        del call
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
