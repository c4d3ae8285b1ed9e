"""Shared benchmark plumbing: the machine, A B A B timing with medians, peak memory in a fresh process, a table.

Every benchmark script times our implementation and its peers on identical configs and weights (our weights
moved across with our own converters), alternating the implementations so that drift of a noisy machine hits
all of them alike, and prints median seconds, the ratio of each peer's median to ours (> 1: we are faster) and
the peak resident memory of one process that loads and runs that implementation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from latent_diffusion.inference import prepare_for_inference
from latent_diffusion.inference.memory import release_free_memory
from latent_diffusion.inference.precision import math_precision
from latent_diffusion.runtime import PRECISIONS, autocast

# int8: ours with int8 linear layers (`--precision int8`) over bf16 weights; peers at bf16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}


def at_dtype(model: torch.nn.Module, ours: bool, dtype: torch.dtype, device: str, math: str | None = None,
             **options):
    """(model, input dtype, context factory for each call) at `dtype`. A peer's model is cast to `dtype` and fed
    `dtype` inputs. Ours runs as `Pipeline` runs it, `prepare_for_inference` (`options` go to it): weights stored
    in `dtype`, fp32 inputs, the math at `math` (default: what `math_precision` picks for this device; autocast
    for bf16 math)."""
    import contextlib

    if not ours:
        return model.to(dtype), dtype, contextlib.nullcontext
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    dev = torch.device(device)
    math = math or math_precision(name, dev)
    model = prepare_for_inference(model, dev, dtype, PRECISIONS[math], **options)
    if dtype != torch.float32:
        print(f"ours at {name}: {name} weights, {math} math" + (f", int8 linear layers ({options['int8']})"
                                                                if options.get("int8") else ""))
    return model, torch.float32, (lambda: autocast(dev, math)) if math != "fp32" else contextlib.nullcontext


def inductor_freezing() -> None:
    """What `--compile` measures, at inference: Inductor folds the weights in as constants and prepacks them for
    oneDNN (freezing), as a user compiling for inference would have it."""
    import torch._inductor.config
    torch._inductor.config.freezing = True


def machine() -> str:
    """CPU model and core count (or the GPU), thread count, torch version, date, and on a CPU the host kind:
    its bf16-relevant flags and the math precision the rule picks for bf16 weights (`inference/precision.py`)."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = platform.processor() or "cpu"
        try:
            for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
                if line.startswith("Model name:"):
                    device = line.split(":", 1)[1].strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    kind = "" if torch.cuda.is_available() else f"; {host()['summary']}"
    return (f"{device}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}{kind}")


def host() -> dict:
    """The CPU's vendor, its flags that decide the fast path (AVX-512, bf16, AMX, VNNI) and the bf16 rule's
    choice, for the results table and JSON: a figure names the kind of host it holds on."""
    from latent_diffusion.inference.int8 import int8_mode
    from latent_diffusion.inference.precision import cpu_bf16_math, cpu_capabilities

    capabilities = cpu_capabilities()
    flags = [f for f in ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
             if capabilities.get(f)]
    bf16_math = cpu_bf16_math(capabilities)
    int8 = int8_mode(torch.device("cpu"), capabilities)
    vendor = str(capabilities.get("vendor") or "unknown vendor")
    return {"vendor": vendor, "flags": flags, "bf16_math": bf16_math, "int8_linear": int8, "kind": host_kind(),
            "summary": f"{vendor}, flags {' '.join(flags) or 'none'}, bf16 weights compute in "
                       f"{'bf16' if bf16_math else 'fp32'}, int8 linear layers {int8}"}


def host_kind() -> str:
    """The kind of host a figure holds on, the name of its results folder: the GPU, or the CPU by what decides
    its fast path: cpu-amx (AMX tiles), cpu-<vendor>-avx512bf16, cpu-avx512, cpu-avx2."""
    if torch.cuda.is_available():
        return "cuda-" + torch.cuda.get_device_name(0).lower().replace(" ", "-")
    from latent_diffusion.inference.precision import cpu_capabilities

    flags = cpu_capabilities()
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(str(flags.get("vendor")), "other")
    if flags.get("amx_bf16"):
        return "cpu-amx"
    if flags.get("avx512_bf16"):
        return f"cpu-{vendor}-avx512bf16"
    return "cpu-avx512" if flags.get("avx512_f") else "cpu-avx2"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn` (device synchronised around each)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `repeats` times, in turns (A B A B ...), after `warmup` untimed calls of each."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory_mib(script: str, *args: str) -> float | None:
    """Peak resident memory (MiB) of `python script *args --peak` run in a fresh process (None if it failed).

    On CUDA the script reports its own peak allocated GPU memory instead, as its last line of output."""
    proc = subprocess.run([sys.executable, script, *args, "--peak"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (peak memory run failed: {proc.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def peaks(args, script: str, impls, *extra: str) -> dict[str, float | None]:
    """Peak memory of each implementation, each in its own fresh process running the benchmark's call once with
    `--impl IMPL --dtype DTYPE --device DEVICE *extra` (nothing when --no-peak)."""
    if args.no_peak:
        return {}
    return {impl: peak_memory_mib(script, "--impl", impl, "--device", args.device, *extra) for impl in impls}


def measure_peak(call: Callable[[], object]) -> None:
    """Run `call` once and print the peak memory (MiB) during it: GPU allocations on CUDA, else the resident set
    (VmHWM, reset first through /proc/self/clear_refs, so that building and converting the model do not count;
    resident weights do). Not `ru_maxrss`: it survives fork and exec, so a child of a big process inherits it.
    Before the reset, the C heap's free pages go back to the system (`release_free_memory`) for every
    implementation alike: holes that building left behind are not what the call needs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        release_free_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    call()
    if torch.cuda.is_available():
        print(torch.cuda.max_memory_allocated() / 2**20)
        return
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)


def table(title: str, times: dict[str, list[float]], peaks: dict[str, float | None] | None = None,
          ours: str = "ours", unit: str = "s", per: float = 1.0) -> list[dict]:
    """Print a Markdown table of medians (optionally divided by `per`), ratio to `ours`, and peak memory."""
    peaks = peaks or {}
    base = statistics.median(times[ours])
    print(f"\n### {title}\n\n| implementation | median {unit} | peer / ours | runs | peak MiB |\n|---|---|---|---|---|")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        peak = peaks.get(name)
        rows.append({"name": name, "median_s": median, "ratio": median / base, "runs": len(values), "peak_mib": peak})
        print(f"| {name} | {median / per:.3f} | {median / base:.2f} | {len(values)} | "
              f"{'' if peak is None else f'{peak:.0f}'} |")
    return rows


def arguments(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
              int8: bool = False) -> argparse.Namespace:
    """Common flags: --dtype (int8 where the script measures it), --repeats, --threads, --device, --json; and the
    internal --peak/--impl pair."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"],
                   choices=[name for name in DTYPES if int8 or name != "int8"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs (each reruns one call)")
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    if extra:
        extra(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_json(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w") as f:
            cpu = {} if torch.cuda.is_available() else {"host": {k: v for k, v in host().items() if k != "summary"}}
            json.dump({"machine": machine(), **cpu, **figures}, f, indent=2)
            f.write("\n")
