"""Device and precision, chosen by the caller at run time (how inference then stores and computes: `inference/`),
and the C heap's behaviour where the process runs on a CPU."""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

# the dtype weights are kept in (int8: the linear layers' in int8, `inference/int8.py`, the others in bf16)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}


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


def reuse_freed_memory() -> bool:
    """Have glibc's allocator keep the memory PyTorch frees on the CPU for the tensors that follow, rather than
    return it to the operating system; whether it applied (glibc only: elsewhere nothing changes).

    glibc serves each block above a threshold (32 MB at most) by a fresh `mmap` and unmaps it when freed, and
    gives the heap's free top back beyond another; a training step that makes and frees the same large tensors
    every time (activations, weight gradients, autocast's casts) then faults every page of them in anew, step
    after step. SD 1.5's UNet, bf16 autocast step of batch 2 at 32² latents on a 2-core Xeon with AMX: 13.5–15.7 s
    per step as glibc sets itself, 4.0–5.2 with this (`benchmarks/train_step.py`). The cost: what the process
    once held stays held (its peak) until it ends or trims (`inference.memory.release_free_memory`). The
    trainers call it on a CPU (`training.loop.distributed_context`)."""
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@functools.cache
def libc_function(name: str):
    """glibc's function `name`, or None where the C library is not glibc (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
