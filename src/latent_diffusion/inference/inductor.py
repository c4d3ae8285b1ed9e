"""Inductor as the UNet's execution backend (`ldm generate --backend inductor`, and `auto` where it pays).

Only the UNet's forward moves: the samplers, guidance, text encoder and decoder stay in eager PyTorch. The UNet
is exported (`torch.export`, which takes the plain forward: the eager fast paths of `layers.py` stand aside) and
compiled ahead of time by AOTInductor with freezing: the weights become constants of the graph and, on a CPU,
are reordered once into oneDNN's blocked layouts, where eager oneDNN reorders them at every call (and
`torch.compile` with freezing reorders them again in every process, after minutes of compiling). The package
(.pt2: kernels and weights, 1.7 GB for SD 1.5 in bf16) is kept in the cache (`compiled.py`; LDM_INDUCTOR_CACHE=''
turns it off), so a later process loads it instead of compiling. CPU or CUDA (not yet measured on a GPU), at the
dtype the weights are kept in; it needs a C++ compiler (g++, or $CXX).

On a CPU the package runs with its weights moved onto cache-line boundaries (`CpuPackage` says why: as
AOTInductor's runtime lays them out, SD 1.5's package ran 20 % behind eager).

Where it pays (2-core Xeon with AMX; `auto` measures it on each host and keeps PyTorch where it does not):
- the bundled shapes model (`models/ldm-shapes`), per UNet call: 0.0085 s against eager's 0.027 in bf16 (0.019
  against 0.057 at a busier moment), 0.032 against 0.048 in fp32 (eager's time there is Python's, per layer; the
  package has none), after a compile of about a minute;
- SD 1.5's UNet (batch 2, 64² latents, bf16): 1.489 s per call against eager's 1.651, our UNet under
  `torch.compile` 1.590 and diffusers' under `torch.compile` 1.452, in one run of `benchmarks/unet.py`; 1.42–1.51
  against diffusers' compiled 1.47–1.55 in processes of their own. Compiling takes about 3 minutes (a 1.7 GB
  package), loading it 10–30 s.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from latent_diffusion.inference.compiled import CompiledUNet, Positional
from latent_diffusion.runtime import reuse_freed_memory

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
        if self.cache_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                self._write(Path(tmp), names, tensors)
                return self._load(Path(tmp) / self.artefact)
        return self._load(self._cached(signature, names, tensors))

    def _load(self, package: Path):
        if self.device.type == "cpu":
            # SD 1.5's package makes and frees ~250 MB of large buffers per call, each a fresh mapping as glibc
            # sets itself: 0.11-0.13 s of page faults per call, 0.01 with freed memory kept (1.42-1.44 s per call
            # at best against 1.51-1.56).
            reuse_freed_memory()
            return CpuPackage(package)
        from torch._inductor import aoti_load_package

        compiled = aoti_load_package(str(package))
        return lambda tensors: compiled(*tensors)

    def _write(self, folder: Path, names: tuple[str, ...], tensors: list[torch.Tensor]) -> None:
        from torch._inductor import aoti_compile_and_package, config

        with torch.no_grad(), config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # export's notes on its own internals
            program = torch.export.export(Positional(self.module, names, self.dtype), tuple(tensors))
            aoti_compile_and_package(program, package_path=str(folder / self.artefact))


class CpuPackage:
    """A package's model run on a CPU by AOTInductor's runner, as a function of its tensors, with its weights in
    memory aligned to 64 bytes. The runtime copies the weights from its library into one `std::malloc` block and
    lays them out at multiples of 64 bytes from the block's start, but glibc aligns the block to 16 bytes only:
    every weight began 16 bytes past a cache line, and oneDNN's AMX kernels read each row across two lines (SD
    1.5's convolutions took 1.5–3× their time under `torch.compile`, the same kernels, and the whole package 20 %
    more than eager PyTorch). Here each weight is cloned (ATen allocates at 64 bytes), the runner's spare set of
    constants takes the clones, becomes the active set, and the block is freed: the weights' memory twice for a
    moment, then once, as before."""

    def __init__(self, package: Path):
        with zipfile.ZipFile(package) as archive, tempfile.TemporaryDirectory() as tmp:
            (library,) = (name for name in archive.namelist() if name.endswith(".wrapper.so"))
            self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(archive.extract(library, tmp), 1)
        names = {fqn: name for name, fqn in self.runner.get_constant_names_to_original_fqns().items()}
        self.weights = {names[fqn]: tensor.clone() for fqn, tensor in self.runner.extract_constants_map(False).items()}
        self.runner.update_constant_buffer(self.weights, True, True, True)  # spare set; all of them; ours to keep
        self.runner.swap_constant_buffer()
        self.runner.free_inactive_constant_buffer()

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        (output,) = self.runner.run(list(tensors))
        return output


@functools.cache
def _found(program: str) -> bool:
    """Whether `program` is on the PATH (looked up once per name: `auto` asks at every UNet call)."""
    return shutil.which(program) is not None
