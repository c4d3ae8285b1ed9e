"""Precision at inference: the dtype the weights are kept in, and the one the arithmetic runs at, decided by rule.

bf16 weights take half the memory of fp32 on any device. Whether bf16 *math* pays too depends on the CPU, and the
flags alone do not tell (measured with 4096² matmuls, 2 threads):
- AMX bf16 tiles (Intel Sapphire Rapids and later): bf16 at about 7x the fp32 rate (2,668 against 397 GFLOP/s);
- AMD's `avx512_bf16` (Zen 4, this project's CI host): about 2.3x (384-412 against 168-179 GFLOP/s);
- Intel's `avx512_bf16` without AMX (a Xeon VM of 2026-11-27): about half (163-170 against 289-339 GFLOP/s).
So bf16 math runs with AMX, or with AMD's avx512_bf16; elsewhere the weights are stored in bf16 and cast layer by
layer to fp32 for the math. `LDM_CPU_BF16_MATH=1|0` decides over the rule.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

BF16_MATH_VARIABLE = "LDM_CPU_BF16_MATH"  # 1 or 0: bf16 or fp32 math for bf16 weights on a CPU, whatever the rule


def math_precision(precision: str, device: torch.device) -> str:
    """The precision the arithmetic runs at for `precision`: bf16 on a CPU only where `cpu_bf16_math` says so."""
    if precision == "int8":  # the linear layers' products are int8; the rest runs as bf16 weights would
        precision = "bf16"
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_math():
        return "fp32"
    return precision


def cpu_bf16_math(capabilities: Mapping[str, object] | None = None) -> bool:
    """Whether bf16 weights compute in bf16 on this CPU (else in fp32): as LDM_CPU_BF16_MATH = 1 or 0 says when
    set, else where the CPU has AMX bf16 tiles or is an AMD one with avx512_bf16 (`capabilities`:
    `cpu_capabilities()`, PyTorch's flags and the vendor). No timing: the same CPU always gets the same answer,
    however busy it is. The decision is logged once per process."""
    forced = os.environ.get(BF16_MATH_VARIABLE)
    if forced is not None and forced not in ("0", "1"):
        raise ValueError(f"{BF16_MATH_VARIABLE} = {forced!r}: expected 1 (bf16 math) or 0 (fp32 math)")
    if forced is not None:
        bf16, why = forced == "1", f"{BF16_MATH_VARIABLE}={forced}"
    else:
        bf16, why = _bf16_rule(cpu_capabilities() if capabilities is None else capabilities)
    _log_once(f"bf16 weights compute in {'bf16' if bf16 else 'fp32'} on the CPU ({why})")
    return bf16


def _bf16_rule(capabilities: Mapping[str, object]) -> tuple[bool, str]:
    if capabilities.get("amx_bf16"):
        return True, "the CPU has AMX bf16 tiles"
    if capabilities.get("avx512_bf16") and capabilities.get("vendor") == "AuthenticAMD":
        return True, "an AMD CPU with avx512_bf16: bf16 matmuls at about twice the fp32 rate"
    if capabilities.get("avx512_bf16"):
        return False, "avx512_bf16 without AMX on an Intel CPU: bf16 matmuls at about half the fp32 rate"
    return False, "no bf16 matrix instructions on this CPU"


def cpu_capabilities() -> Mapping[str, object]:
    """The CPU's instruction-set flags as PyTorch reports them (`amx_bf16`, `avx512_bf16`, …; the flags line of
    /proc/cpuinfo where this PyTorch has no `torch.cpu.get_capabilities`, each flag True), and its `vendor`
    (/proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD; "" where unknown)."""
    flags = (dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities")
             else dict.fromkeys(_proc_cpuinfo("flags").split(), True))
    return {**flags, "vendor": _proc_cpuinfo("vendor_id")}


@functools.cache
def amx_bf16_tiles() -> bool:
    """Whether this CPU has AMX bf16 tiles (looked up once)."""
    return bool(cpu_capabilities().get("amx_bf16"))


@functools.cache
def _proc_cpuinfo(field: str) -> str:
    """The first line of /proc/cpuinfo for `field`, its value ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def store_weights(module: nn.Module, dtype: torch.dtype, math_dtype: torch.dtype) -> nn.Module:
    """Keep `module`'s parameters in `dtype` (half the memory of fp32 for bf16/fp16). When `math_dtype` differs,
    every submodule casts its own parameters to `math_dtype` for the length of its forward and back afterwards
    (layerwise casting: one layer's copy at a time, so memory stays at `dtype`'s size); a module whose class sets
    `cast_as_one` (the inference layers of `layers.py` whose forward reads their children's weights directly or
    calls them several times) casts all of its descendants' at once. An `nn.Embedding` casts the rows it looks
    up instead of its table (the same values: CLIP's 49,408-token table is 152 MB in fp32, for 77 rows). Buffers
    and quantised weights (`int8.py`) stay as they are. Inference only: the casts bypass autograd."""
    for param in module.parameters():
        if _plain(param):
            param.data = param.data.to(dtype)
    if math_dtype == dtype:
        return module
    for sub in _cast_units(module):
        if isinstance(sub, nn.Embedding):
            sub.register_forward_hook(lambda _, args, rows: rows.to(math_dtype))
            continue
        whole = getattr(sub, "cast_as_one", False)
        own = [name for name, p in sub.named_parameters(recurse=whole) if p.is_floating_point() and _plain(p)]
        if own:
            sub.register_forward_pre_hook(functools.partial(_cast_in, names=own, dtype=math_dtype))
            sub.register_forward_hook(functools.partial(_cast_out, names=own), always_call=True)
    return module


def _plain(param: nn.Parameter) -> bool:
    """A plain tensor's parameter, not a quantised one (torchao's int8 weights: `int8.py`), which stays as it is."""
    return type(param.data) is torch.Tensor


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
