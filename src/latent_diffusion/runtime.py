"""Device and precision, chosen by the caller at run time."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import time

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or another PyTorch device name") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use 'cpu' or 'auto')")
    return device


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for `precision`; fp16 on a CPU is refused (its matmuls are ~300x slower than bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is unusably slow on a CPU; use bf16 or fp32")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 for `precision`, or a no-op for fp32."""
    dtype = check_precision(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def channels_last_on_cpu(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in channels-last memory format on a CPU, where oneDNN convolves NHWC tensors without reordering
    them: the SD VAE decodes 512² about 12 % faster and in less memory (the UNet gains nothing measurable)."""
    return module.to(memory_format=torch.channels_last) if device.type == "cpu" else module


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether `x` is being computed on by PyTorch's eager CPU kernels without gradients: where the layers' CPU
    inference paths (tuned against oneDNN's kernels) apply. Not when traced (OpenVINO converts the plain graph)
    or compiled."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def math_precision(precision: str, device: torch.device) -> str:
    """The precision the arithmetic runs at for `precision`: bf16 only where the device multiplies bf16 matrices
    faster than fp32. Some CPUs with native bf16 instructions do it at half their fp32 rate (this project's CI
    host: 166 against 319 GFLOP/s); there bf16 *weights* with fp32 math are both smaller and faster."""
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_math_pays():
        return "fp32"
    return precision


@functools.cache
def cpu_bf16_math_pays() -> bool:
    """Whether this CPU multiplies bf16 matrices clearly (≥ 1.2×) faster than fp32: measured once per process on
    1024² matmuls (~0.1 s); the environment variable LDM_CPU_BF16_MATH=1 or 0 decides instead."""
    forced = os.environ.get("LDM_CPU_BF16_MATH")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"LDM_CPU_BF16_MATH = {forced!r}: expected 1 (bf16 math) or 0 (fp32 math)")
        return forced == "1"
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(8):
            a @ b
        seconds[dtype] = time.perf_counter() - start
    pays = seconds[torch.float32] >= 1.2 * seconds[torch.bfloat16]
    log.info("bf16 matmul %.1fx the fp32 rate on this CPU: %s math for bf16 weights",
             seconds[torch.float32] / seconds[torch.bfloat16], "bf16" if pays else "fp32")
    return pays


def store_weights(module: nn.Module, dtype: torch.dtype, math_dtype: torch.dtype) -> nn.Module:
    """Keep `module`'s parameters in `dtype` (half the memory of fp32 for bf16/fp16). When `math_dtype` differs,
    every submodule casts its own parameters to `math_dtype` for the length of its forward and back afterwards
    (layerwise casting: one layer's copy at a time, so memory stays at `dtype`'s size); a module whose class sets
    `cast_as_one` casts all of its descendants' at once, for a forward that calls them several times. An
    `nn.Embedding` casts the rows it looks up instead of its table (the same values: CLIP's 49,408-token table is
    152 MB in fp32, for 77 rows). Buffers stay as they are. Inference only: the casts bypass autograd."""
    for param in module.parameters():
        param.data = param.data.to(dtype)
    if math_dtype == dtype:
        return module
    for sub in _cast_units(module):
        if isinstance(sub, nn.Embedding):
            sub.register_forward_hook(lambda _, args, rows: rows.to(math_dtype))
            continue
        whole = getattr(sub, "cast_as_one", False)
        own = [name for name, p in sub.named_parameters(recurse=whole) if p.is_floating_point()]
        if own:
            sub.register_forward_pre_hook(functools.partial(_cast_in, names=own, dtype=math_dtype))
            sub.register_forward_hook(functools.partial(_cast_out, names=own), always_call=True)
    return module


def _cast_units(module: nn.Module):
    """`module` and its descendants, except those inside a `cast_as_one` module (cast with it)."""
    yield module
    if not getattr(module, "cast_as_one", False):
        for child in module.children():
            yield from _cast_units(child)


def _cast_in(module: nn.Module, args, names: list[str], dtype: torch.dtype) -> None:
    module._stored_weights = {}
    for name in names:
        param = module.get_parameter(name)
        module._stored_weights[name] = param.data
        param.data = param.data.to(dtype)


def _cast_out(module: nn.Module, args, output, names: list[str]) -> None:
    for name, data in module.__dict__.pop("_stored_weights", {}).items():
        module.get_parameter(name).data = data


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's `malloc_trim`; nothing elsewhere).

    PyTorch frees CPU tensors into the C heap, and a free hole between live blocks stays resident. Storing
    SD 1.5's fp32 weights in bf16 leaves ~950 MiB of such holes (resident 3,247 → 2,310 MiB once trimmed), and
    the UNet's activations ~550 MiB that the VAE's differently sized ones do not reuse; `Pipeline` trims before
    sampling and before decoding (~30 ms), which takes its bf16 text-to-image peak from 3,270–3,293 MiB to
    2,928–3,100."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: musl, macOS, Windows
        return None
