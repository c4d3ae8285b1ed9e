"""Peak resident memory of loading a Stable Diffusion 1.5-sized model and drawing one tiny image, against the size
of its weights: `Pipeline.from_pretrained(path, device, precision)`, then one 64×64 image in 1 step, in a fresh
process per format and precision. The model (seeded random weights: none can be downloaded here) is written by our
own converters as an original checkpoint (one .safetensors file), a native model folder and, with
`--formats diffusers`, a diffusers folder (4.3 GB each in fp32).

    python benchmarks/load_memory.py [--dtype fp32 bf16] [--formats original native] [--folder DIR]

"weights" is the size of the parameters of the UNet, autoencoder and text encoder as the pipeline holds them (at
the precision asked for); "baseline" the process's resident memory once Python, torch and this package are
imported, before anything is loaded. The peaks (VmHWM) count every page the process held at once, baseline
included, mapped file pages once read: after `from_pretrained`, and after the image too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import sd15_parts  # noqa: E402
from harness import arguments, machine, write_json  # noqa: E402

from latent_diffusion.formats.model import FORMATS, save_model  # noqa: E402
from latent_diffusion.pipeline import Pipeline  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"
FILE_NAMES = {"original": "sd15.safetensors", "native": "sd15-native", "diffusers": "sd15-diffusers"}


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM ...), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def weights_mib(pipe: Pipeline) -> float:
    """MiB of the parameters of the pipeline's UNet, autoencoder and condition encoder, as it holds them."""
    modules = (pipe.unet, pipe.autoencoder, pipe.conditioner.encoder)
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters()) / 2**20


def measure(path: str, precision: str, device: str) -> None:
    """Load `path`, draw one tiny image and print the figures (MiB) as one JSON line (the `--peak` run)."""
    baseline = status_mib("VmRSS")
    pipe = Pipeline.from_pretrained(path, device=device, precision=precision)
    loaded = status_mib("VmHWM")
    pipe.generate_tensors(PROMPT, steps=1, height=64, width=64, progress=False)
    figures = {"weights_mib": weights_mib(pipe), "baseline_mib": baseline, "load_peak_mib": loaded,
               "peak_mib": status_mib("VmHWM")}
    if torch.cuda.is_available():
        figures["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(figures))


def peak_run(path: Path, precision: str, device: str) -> dict:
    """`measure` in a fresh process (so that nothing this one holds counts)."""
    command = [sys.executable, __file__, "--peak", "--model", str(path), "--dtype", precision, "--device", device]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the peak run for {path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_models(folder: Path, formats: list[str]) -> None:
    """Write the random SD 1.5 model in each format under `folder` where it is not there yet."""
    missing = [fmt for fmt in formats if not (folder / FILE_NAMES[fmt]).exists()]
    if missing:
        parts = sd15_parts()
        for fmt in missing:
            save_model(parts, folder / FILE_NAMES[fmt], fmt)


def main() -> None:
    def extra(p):
        p.add_argument("--formats", nargs="+", default=["original", "native"], choices=FORMATS)
        p.add_argument("--folder", default=None, help="where the models are written (default: a temporary folder, "
                                                      "deleted afterwards); models already there are used as they are")
        p.add_argument("--model", default=None, help=argparse.SUPPRESS)

    args = arguments(__doc__, extra)
    if args.peak:
        measure(args.model, args.dtype[0], args.device)
        return
    print(f"load + one 64² image in 1 step, SD 1.5 architecture, random weights — {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        write_models(folder, args.formats)
        print("\n| format | precision | weights MiB | baseline MiB | peak after loading MiB | peak MiB | "
              "peak / weights |\n|---|---|---|---|---|---|---|")
        for fmt in args.formats:
            for precision in args.dtype:
                row = {"format": fmt, "precision": precision,
                       **peak_run(folder / FILE_NAMES[fmt], precision, args.device)}
                row["ratio"] = row["peak_mib"] / row["weights_mib"]
                rows.append(row)
                print(f"| {fmt} | {precision} | {row['weights_mib']:,.0f} | {row['baseline_mib']:,.0f} | "
                      f"{row['load_peak_mib']:,.0f} | {row['peak_mib']:,.0f} | {row['ratio']:.2f} |", flush=True)
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
