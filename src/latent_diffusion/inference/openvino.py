"""OpenVINO as the UNet's execution backend on the CPU (`ldm generate --backend openvino`, and `auto` where it pays).

Only the UNet's forward moves: the samplers, guidance, text encoder and decoder stay in PyTorch. OpenVINO
converts the UNet's PyTorch graph (with our weights, in the dtype they are stored in: bf16 weights make a graph of
half the size) once per input signature — names, shapes and dtypes of the arguments, which stay fixed through one
generation — and compiles it for the CPU at fp32 or bf16 inference precision; later calls with the same signature
reuse it. Optional dependency: `pip install openvino`.

Converting is the slow part (tracing the whole UNet), so each converted graph is kept on disk (`compiled.py`:
keyed by a digest of the weights and the signature), with OpenVINO's own cache of compiled blobs beside it: a
later process with the same weights reads them instead (LDM_OPENVINO_CACHE='' turns it off). For SD 1.5 on the
CI host (bf16): the first call takes 63–71 s without the cache, 104 s while writing it (3.4 GB of graph with its
fp32 weights, 3.3 GB of compiled blob; 1.7 GB of graph from bf16 weights), 17 s once it is there; each later
call 10 s.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from latent_diffusion.inference.compiled import CompiledUNet, Positional

HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVINOUNet(CompiledUNet):
    """Calls like the UNet — `(x, t, context=..., context_mask=..., class_labels=...)` → fp32 tensor — and runs
    it compiled by OpenVINO. `module` is any `nn.Module` with that calling convention, converted with its weights
    as it computes with them: at `dtype` (default: its weights' dtype; fp32 where bf16 weights are cast to fp32
    layer by layer, `precision.store_weights`)."""

    name, title, artefact = "openvino", "OpenVINO", "unet.xml"

    @staticmethod
    def problem(device: torch.device, precision: str, math: str) -> str | None:
        if device.type != "cpu":
            return f"backend 'openvino' runs on the CPU; device is {device}"
        if precision not in HINTS:
            return f"backend 'openvino' runs fp32 or bf16, not --precision {precision}; use backend 'torch'"
        if not installed():
            return "backend 'openvino' needs the openvino package: pip install openvino"
        return None

    def __init__(self, module: nn.Module, precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None):
        import openvino  # its absence is reported by `problem` before a pipeline gets here

        if precision not in HINTS:
            raise ValueError(f"precision = {precision!r}: the OpenVINO backend runs {' or '.join(HINTS)}")
        self.ov, self.core = openvino, openvino.Core()
        super().__init__(module, precision, cache_dir,
                         dtype or next(p.dtype for p in module.parameters() if p.is_floating_point()))

    def _compiler_version(self) -> str:
        return self.ov.__version__

    def _compile(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]):
        config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision]}
        if self.cache_dir is None:
            compiled = self.core.compile_model(self._convert(names, tensors), "CPU", config)
        else:
            xml = self._cached(signature, names, tensors)
            compiled = self.core.compile_model(str(xml), "CPU", {**config, "CACHE_DIR": str(xml.parent / "blobs")})
        request = compiled.create_infer_request()

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            arrays = [v.detach().cpu().numpy() for v in tensors]
            return torch.from_numpy(request.infer(arrays)[0].copy())  # the output buffer is reused by the next call

        return run

    def _write(self, folder: Path, names: tuple[str, ...], tensors: list[torch.Tensor]) -> None:
        self.ov.save_model(self._convert(names, tensors), folder / self.artefact, compress_to_fp16=False)

    def _convert(self, names: tuple[str, ...], tensors: list[torch.Tensor]):
        with torch.no_grad(), warnings.catch_warnings():
            # The trace is specialised to this signature's shapes on purpose: shape checks become constants.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return self.ov.convert_model(Positional(self.module, names, self.dtype), example_input=tuple(tensors))


@functools.cache
def installed() -> bool:
    """Whether the openvino package can be imported (looked up once)."""
    return importlib.util.find_spec("openvino") is not None
