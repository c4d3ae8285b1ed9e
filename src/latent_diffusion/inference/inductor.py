"""Inductor as the UNet's execution backend (`ldm generate --backend inductor`, and `auto` where it pays).

Only the UNet's forward moves: the samplers, guidance, text encoder and decoder stay in eager PyTorch. The UNet
is exported (`torch.export`, which takes the plain forward: the eager fast paths of `layers.py` stand aside) and
compiled ahead of time by AOTInductor with freezing: the weights become constants of the graph and, on a CPU,
are reordered once into oneDNN's blocked layouts, where eager oneDNN reorders them at every call (and
`torch.compile` with freezing reorders them again in every process, after minutes of compiling). The package
(.pt2: kernels and weights, 1.7 GB for SD 1.5 in bf16) is kept in the cache (`compiled.py`; LDM_INDUCTOR_CACHE=''
turns it off), so a later process loads it instead of compiling. CPU or CUDA (not yet measured on a GPU), at the
dtype the weights are kept in; it needs a C++ compiler (g++, or $CXX).

Where it pays (2-core Xeon with AMX; `auto` measures it on each host and keeps PyTorch where it does not):
- the bundled shapes model (`models/ldm-shapes`), per UNet call: 0.019 s against eager's 0.057 in bf16, 0.032
  against 0.048 in fp32 (eager's time there is Python's, per layer; the package has none), after a compile of
  about a minute;
- not SD 1.5's UNet (batch 2, 64² latents, bf16): 1.97–2.03 s per call against eager's 1.60–1.67 and
  `torch.compile`'s 1.66–1.71 for the same graph in the same process; the difference is in oneDNN's kernels
  (0.4 s more per call, by `perf`), as the packaged runtime calls them. Compiling takes about 3 minutes, loading
  the package 8–19 s. oneDNN's own timings put it in a few large products, sporadically: the 8,192 × 320 →
  2,560 projection takes 15–17 ms per call under `torch.compile`, 19–364 ms in the package. With glibc's large
  blocks kept in its heap (`runtime.reuse_freed_memory`) from before the package is loaded and before anything
  else is allocated, the package ran at 1.42–1.45 s against eager's 1.54–1.68; set after the eager UNet was
  built (as a pipeline would), it changed nothing (1.88). So memory placement, not the kernels; not pinned down.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from latent_diffusion.inference.compiled import CompiledUNet, Positional

PRECISIONS = ("fp32", "bf16", "fp16")


class InductorUNet(CompiledUNet):
    """Calls like the UNet — `(x, t, context=..., context_mask=..., class_labels=...)` → fp32 tensor — and runs
    it compiled by AOTInductor on the device its weights are on. `module` is any `nn.Module` with that calling
    convention; `dtype` (default: its weights' dtype) must be the dtype its weights are kept in: a package holds
    the weights as the graph computes with them, and bf16 weights cast to fp32 layer by layer would make it twice
    the size."""

    name, title, artefact = "inductor", "Inductor", "unet.pt2"

    @staticmethod
    def problem(device: torch.device, precision: str, math: str) -> str | None:
        if precision not in PRECISIONS:
            return f"backend 'inductor' runs {', '.join(PRECISIONS)}, not --precision {precision}; use backend 'torch'"
        if math != precision:
            return (f"backend 'inductor' computes at the precision the weights are kept in; on this CPU {precision} "
                    f"weights compute in {math} (inference/precision.py): use --precision {math}, or backend 'torch'")
        compiler = os.environ.get("CXX") or "g++"
        if not _found(compiler):
            return (f"backend 'inductor' compiles C++ and finds no compiler {compiler!r} (install g++, or name one "
                    "in $CXX)")
        return None

    def __init__(self, module: nn.Module, precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision = {precision!r}: the Inductor backend runs {', '.join(PRECISIONS)}")
        weights = next(p for p in module.parameters() if p.is_floating_point())
        if dtype not in (None, weights.dtype):
            raise ValueError(f"the Inductor backend computes at the dtype the weights are kept in ({weights.dtype}), "
                             f"not {dtype}: on this CPU bf16 weights compute in fp32 (precision.py); use precision "
                             "fp32 there, or bf16 math (LDM_CPU_BF16_MATH=1)")
        super().__init__(module, precision, cache_dir, weights.dtype)
        self.device = weights.device

    def _compiler_version(self) -> str:
        """PyTorch's version and what the kernels were compiled for: the CPU's vector instructions, or the GPU."""
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            target = f"{torch.cuda.get_device_name(self.device)} sm_{major}{minor}"
        else:
            from torch._inductor.cpu_vec_isa import pick_vec_isa
            target = f"cpu {pick_vec_isa()}"
        return f"aoti {torch.__version__} {target}"

    def _compile(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]):
        from torch._inductor import aoti_load_package

        if self.cache_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                self._write(Path(tmp), names, tensors)
                compiled = aoti_load_package(str(Path(tmp) / self.artefact))
        else:
            compiled = aoti_load_package(str(self._cached(signature, names, tensors)))
        return lambda tensors: compiled(*tensors)

    def _write(self, folder: Path, names: tuple[str, ...], tensors: list[torch.Tensor]) -> None:
        from torch._inductor import aoti_compile_and_package, config

        with torch.no_grad(), config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # export's notes on its own internals
            program = torch.export.export(Positional(self.module, names, self.dtype), tuple(tensors))
            aoti_compile_and_package(program, package_path=str(folder / self.artefact))


@functools.cache
def _found(program: str) -> bool:
    """Whether `program` is on the PATH (looked up once per name: `auto` asks at every UNet call)."""
    return shutil.which(program) is not None
