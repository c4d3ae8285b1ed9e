"""Execution backends for the UNet's forward: PyTorch (the default) or OpenVINO (`backend="openvino"`)."""

from __future__ import annotations

import importlib.util

BACKENDS = ("torch", "openvino")


def check_backend(backend: str, device) -> None:
    """A clear error for an unknown backend or one that cannot run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "openvino" and device.type != "cpu":
        raise ValueError(f"backend 'openvino' runs on the CPU; device is {device}")
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        raise ValueError("backend 'openvino' needs the openvino package: pip install openvino")
