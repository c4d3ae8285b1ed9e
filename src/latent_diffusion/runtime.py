"""Device and precision, chosen by the caller at run time (how inference then stores and computes: `inference/`)."""

from __future__ import annotations

import contextlib

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
