"""OpenVINO as the UNet's execution backend on the CPU (`ldm generate --backend openvino`).

Only the UNet's forward moves: the samplers, guidance, text encoder and decoder stay in PyTorch. OpenVINO
converts the UNet's PyTorch graph (with our weights) once per input signature — names, shapes and dtypes of the
arguments, which stay fixed through one generation — and compiles it for the CPU at fp32 or bf16 inference
precision; later calls with the same signature reuse it. Optional dependency: `pip install openvino`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

HINTS = {"fp32": "f32", "bf16": "bf16"}


class _Positional(nn.Module):
    """`module(x, t, **named)` as a function of positional tensors only (what the converter traces)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.module(x, t, **dict(zip(self.names, rest)))


class OpenVINOUNet:
    """Calls like the UNet — `(x, t, context=..., context_mask=..., class_labels=...)` → fp32 tensor — and runs
    it compiled by OpenVINO. `module` is any `nn.Module` with that calling convention."""

    def __init__(self, module: nn.Module, precision: str = "fp32"):
        import openvino  # its absence is reported by `check_backend` before a pipeline gets here

        if precision not in HINTS:
            raise ValueError(f"precision = {precision!r}: the OpenVINO backend runs {' or '.join(HINTS)}")
        self.ov, self.core = openvino, openvino.Core()
        self.module, self.precision = module.float().eval(), precision
        self.requests: dict[tuple, object] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        names = tuple(sorted(k for k, v in kwargs.items() if v is not None))
        t = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
        tensors = [x.float(), t, *(kwargs[k].float() if kwargs[k].is_floating_point() else kwargs[k]
                                   for k in names)]
        signature = (names, tuple((tuple(v.shape), v.dtype) for v in tensors))
        request = self.requests.get(signature) or self._compile(signature, names, tensors)
        arrays = [v.detach().cpu().contiguous().numpy() for v in tensors]
        return torch.from_numpy(request.infer(arrays)[0].copy())  # the output buffer is reused by the next call

    def _compile(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]):
        with torch.no_grad(), warnings.catch_warnings():
            # The trace is specialised to this signature's shapes on purpose: shape checks become constants.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph = self.ov.convert_model(_Positional(self.module, names), example_input=tuple(tensors))
        compiled = self.core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": HINTS[self.precision]})
        self.requests[signature] = request = compiled.create_infer_request()
        return request
