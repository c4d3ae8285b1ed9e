"""Weights files: safetensors read and written atomically, pickled checkpoints unpickled safely, weights put into
modules. (Training state, with optimizers and RNG, is `training/state.py`.)"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latent_diffusion.files.atomic import atomic_path

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Save a flat tensor dict as safetensors, atomically."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        write_safetensors(tensors, tmp, path, metadata)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a clear error for a missing or corrupt file. On the CPU the tensors are
    memory-mapped: nothing is read until they are used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc} (truncated or not a safetensors file?)") from exc


def read_weights(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read into memory of their own, floating-point ones cast to `dtype` (None:
    as stored) and all put on `device`, one at a time by plain file reads: memory holds each weight once, in its
    final form, plus one stored tensor at most (a memory map's pages, once read, would stay resident besides the
    copies, and its tensors lie at the file's offsets, unaligned for the matmul kernels). `keys` selects the
    tensors to read; the others stay memory-mapped, read only if used."""
    tensors = load_weights(path)
    selected = [k for k in tensors if keys is None or keys(k)]
    try:
        with open(path, "rb") as f:
            size, header = _read_header(f)
            for key in selected:
                begin, end = (8 + size + offset for offset in header[key]["data_offsets"])
                stored = tensors[key]
                tensors[key] = _read_tensor(f, begin, end).view(stored.dtype).reshape(stored.shape).to(
                    device=device, dtype=_target_dtype(stored, dtype))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return tensors


def _read_header(f) -> tuple[int, dict]:
    """(length, JSON) of the header of the safetensors file open as `f`: an 8-byte length, the JSON header, then the
    tensors' bytes at the header's offsets from its end."""
    size = int.from_bytes(f.read(8), "little")
    if not 0 < size <= 100_000_000:
        raise ValueError(f"a header length of {size} bytes: not a safetensors file")
    return size, json.loads(f.read(size))


def _read_tensor(f, begin: int, end: int) -> torch.Tensor:
    """Bytes `begin:end` of the open file `f`, as a fresh uint8 tensor."""
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(begin)
    if f.readinto(raw.numpy()) != end - begin:
        raise ValueError(f"the file ends before byte {end}")
    return raw


def place_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`tensors`, in place, floating-point ones cast to `dtype` (None: as they are) and all moved to `device`, one
    at a time: each replaced tensor is freed (when nothing else holds it) before the next is converted."""
    for key, value in tensors.items():
        tensors[key] = value.to(device=device, dtype=_target_dtype(value, dtype))
    return tensors


def _target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` for a floating-point tensor, else (and when `dtype` is None) the tensor's own."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def load_pickle(path: str | os.PathLike) -> Any:
    """A PyTorch pickle (`.ckpt`, `.bin`) read with `torch.load(..., weights_only=True)`: tensors and plain
    containers only, so a file that would run code is refused (a clear CheckpointError), never executed."""
    if not _looks_like_pickle(path):
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (neither the zip "
                              "archive torch.save writes nor a pickle); a truncated download or another kind of file?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(f"refused to load {path}: its pickle asks for more than tensors and plain containers, "
                              "and only an unsafe unpickler that can run code from the file would accept it "
                              f"({detail.strip()}); use a .safetensors file instead") from exc
    except Exception as exc:  # a cut or corrupt zip/pickle surfaces as RuntimeError, EOFError, ValueError ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc} (truncated, or not a PyTorch checkpoint?)") \
            from exc


def _looks_like_pickle(path: str | os.PathLike) -> bool:
    """Whether `path` starts as torch.save's zip archive or as a pickle (protocol 2+ opens with 0x80)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    return head[:1] == b"\x80" or zipfile.is_zipfile(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def is_complete_safetensors(path: str | os.PathLike) -> bool:
    """Whether `path` is a whole safetensors file: its header parses and the file is as long as the header says
    (a cheap check that reads the header only; a file cut short by a crash fails it)."""
    try:
        with open(path, "rb") as f:
            size, header = _read_header(f)
            f.seek(0, os.SEEK_END)
            length = f.tell()
    except (OSError, ValueError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    return length == 8 + size + max(ends, default=0)


def load_module_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load `tensors` into `module` strictly, naming missing/unexpected keys and shape mismatches."""
    _check_keys(module, tensors, what)
    module.load_state_dict(tensors)


def module_from_weights(build: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor], what: str,
                        dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device | None = None) -> torch.nn.Module:
    """`build()` holding `tensors`, floating-point ones cast to `dtype` (None: as they are) and all moved to
    `device` (None: where they are), checked as in `load_module_weights`. A tensor already so is the parameter
    itself, shared with `tensors`, not copied: weights from `read_weights(path, dtype, device)` are held once.
    The module is built on the meta device, so no random initialisation runs and no copy of it is made."""
    with torch.device("meta"):
        module = build()
    _check_keys(module, tensors, what)
    module.load_state_dict({k: v.to(device=device or v.device, dtype=_target_dtype(v, dtype))
                            for k, v in tensors.items()}, assign=True)
    for name, buffer in list(module.named_buffers()):  # non-persistent buffers are not in `tensors`
        if buffer.is_meta:
            if buffer.numel():
                raise RuntimeError(f"{what}: buffer {name} has no stored value; build this module directly")
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = torch.zeros(buffer.shape, dtype=buffer.dtype,
                                                                     device=device)
    return module


def _check_keys(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
        raise CheckpointError(f"{what} does not match the model config: " + "; ".join(parts))


def write_safetensors(tensors: dict[str, torch.Tensor], tmp: Path, path: str | os.PathLike,
               metadata: dict[str, str] | None) -> None:
    """safetensors' `save_file` into `tmp`, its write errors (a full disk) as an OSError naming `path`."""
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        detail = "No space left on device" if "StorageFull" in str(exc) or "os error 28" in str(exc) else str(exc)
        raise OSError(errno.ENOSPC if detail.startswith("No space") else errno.EIO, f"cannot write: {detail}",
                      str(path)) from exc
